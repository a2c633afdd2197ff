"""Broker and Celery configuration, with no app created at import.

The worker's app (``celery_app.app``) and any other process that only
publishes (the listener's stability monitor, ``preread retry``) build theirs
with :func:`make_celery` from their own settings.

Brokers: Redis redelivers a task whose worker died only after the visibility
timeout (derived from ``PREREAD_LONGEST_TASK``), so on Redis the reconciler
(``PREREAD_RECONCILE_AFTER``) usually recovers first; RabbitMQ returns an
unacknowledged task to its queue as soon as the worker's connection drops,
so recovery takes seconds. The embedded default needs no server.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from preread.schemas.settings import Settings, get_settings
from preread.worker.pipeline.queues import QUEUES, RENDER, TASK_FOR_TOPIC

#: Message priority per study urgency rank (0 routine, 1 priority, 2 stat).
#: Celery's Redis transport serves *lower* numbers first.
REDIS_PRIORITY = {-1: 9, 0: 6, 1: 3, 2: 0}  # -1: archive sweep studies, after every live one


def embedded_broker(settings: Settings) -> tuple[str, dict[str, object]]:
    """A broker that needs no server: message files in the data dir (:mod:`.embedded_queue`).

    Messages are fsynced when ``PREREAD_SYNC_WRITES`` is on, as the listener's files are.
    """
    from preread.worker.pipeline import embedded_queue  # registers the preread-fs:// transport

    folder = (settings.data_dir / "queue").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    options: dict[str, object] = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
        "sync": settings.sync_writes,
        "polling_interval": embedded_queue.FAST_POLL_S,
        "idle_polling_interval": embedded_queue.IDLE_POLL_S,
    }
    return f"{embedded_queue.SCHEME}://", options


def message_priority(broker_url: str, rank: int) -> int | None:
    """The message priority for an urgency rank, or None where the broker has none."""
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        return REDIS_PRIORITY.get(rank, REDIS_PRIORITY[0])
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return max(rank, 0) * 4  # AMQP serves higher numbers first (a sweep's -1 shares routine's 0)
    return None


def make_celery(settings: Settings | None = None) -> Celery:
    """A configured Celery app for ``settings`` (default: the environment's)."""
    settings = settings or get_settings()
    transport_options: dict[str, object]
    if settings.broker_url:
        broker_url, transport_options = settings.broker_url, {}
    else:
        broker_url, transport_options = embedded_broker(settings)
    if broker_url.startswith(("redis://", "rediss://")):
        transport_options = {
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.effective_visibility_timeout,
        }
    app = Celery("preread", broker=broker_url, include=["preread.worker.pipeline.tasks"])
    exchange = Exchange("preread", type="direct")
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name, exchange, routing_key=name, queue_arguments={"x-max-priority": 10}) for name in QUEUES],
        task_default_queue=RENDER,
        task_default_exchange="preread",
        task_routes={task: {"queue": topic, "routing_key": topic} for topic, task in TASK_FOR_TOPIC.items()},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    app.conf.preread_settings = settings
    return app


def queue_folder(settings: Settings) -> Path:
    """Where the embedded broker keeps its messages."""
    return settings.data_dir / "queue"

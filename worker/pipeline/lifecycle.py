"""A worker's lifecycle: its heartbeat, the readiness of its infer queue, and its signals.

An infer worker does not consume the infer queue until its model has loaded
on the configured device: until then its heartbeat says ``not_ready`` with a
one-line reason naming the model, the device and the fix, it rechecks every
``PREREAD_READINESS_RECHECK`` seconds (and at once when ``preread retry``
asks), and studies wait in RENDERED without an attempt being counted. Its
other queues (export) are served meanwhile. SIGHUP ends a worker as SIGTERM
does (a warm shutdown), instead of Celery's re-exec of the command line.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from preread.schemas.settings import Settings
from preread.schemas.tables import ProcessRole, ProcessState, utcnow
from preread.worker.pipeline.heartbeat import HeartbeatWriter, recheck_requested
from preread.worker.pipeline.queues import INFER

log = logging.getLogger(__name__)

#: Seconds between looks for a recheck request while not ready.
NUDGE_POLL_S = 2.0

_state: dict[str, Any] = {}


def _queues() -> list[str]:
    return [q for q in os.environ.get("PREREAD_WORKER_QUEUES", "").split(",") if q]


def _settings(app: Any) -> Settings:
    settings: Settings = app.conf.preread_settings
    return settings


@celeryd_after_setup.connect
def _hold_infer_queue(sender: str, instance: Any, **_: Any) -> None:
    """Start without consuming the infer queue: it is added once the model has loaded."""
    if INFER in _queues():
        instance.app.amqp.queues.deselect(INFER)


@worker_ready.connect
def _on_ready(sender: Any, **_: Any) -> None:
    """The worker is up: beat, take SIGHUP as a stop, and make the infer queue wait for the model."""
    consumer = sender
    app = consumer.app
    settings = _settings(app)
    queues = _queues()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))  # a warm shutdown, never a re-exec
    beat = HeartbeatWriter(settings.effective_database_url, ProcessRole.WORKER, queues=",".join(queues),
                           state=ProcessState.STARTING if INFER in queues else ProcessState.READY,
                           details={"node": consumer.hostname})
    _state["beat"] = beat.start()
    if INFER in queues:
        watcher = threading.Thread(target=_wait_for_model, args=(consumer, settings, beat), name="preread-readiness",
                                   daemon=True)
        watcher.start()


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    beat = _state.pop("beat", None)
    if beat is not None:
        beat.stop()


def _wait_for_model(consumer: Any, settings: Settings, beat: HeartbeatWriter) -> None:
    """Check the model until it loads, then consume the infer queue."""
    from preread.worker.inference.engine import readiness_problem

    said = None
    while True:
        checked_at = utcnow()
        problem = readiness_problem(settings)
        if problem is None:
            beat.mark(ProcessState.READY, None, model=settings.model, device=settings.device)
            consumer.call_soon(consumer.add_task_queue, INFER)
            log.info("model %s ready on %s: consuming the infer queue", settings.model, settings.device)
            return
        if problem != said:
            log.error("not ready for infer: %s", problem)
            said = problem
        beat.mark(ProcessState.NOT_READY, problem, model=settings.model, device=settings.device)
        deadline = time.monotonic() + settings.readiness_recheck
        while time.monotonic() < deadline:
            time.sleep(min(NUDGE_POLL_S, max(0.0, deadline - time.monotonic())))
            try:
                if recheck_requested(settings.effective_database_url, checked_at):
                    log.info("recheck asked by preread retry")
                    break
            except Exception:  # the database away: recheck on the timer
                pass

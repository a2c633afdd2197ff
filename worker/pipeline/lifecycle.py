"""A worker's lifecycle: its heartbeat, the readiness of its infer queue, and its signals.

An infer worker does not consume the infer queue until its model has loaded
on the configured device: until then its heartbeat says ``not_ready`` with a
one-line reason naming the model, the device and the fix, it rechecks every
``PREREAD_READINESS_RECHECK`` seconds (and at once when ``preread retry``
asks), and studies wait in RENDERED without an attempt being counted. Its
other queues (export) are served meanwhile. A ready worker can become not
ready again: when an infer task finds its PREREAD_WORKER_TOKEN refused
(:func:`pause_infer`), the worker stops consuming the infer queue, says why in
its heartbeat and watches for the fix the same way. SIGHUP ends a worker as
SIGTERM does (a warm shutdown), instead of Celery's re-exec of the command line.

Pausing needs the consumer, so it works where tasks run in the worker's own
process (the ``threads`` pool an infer worker gets by default, or ``solo``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import datetime
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from preread.schemas.settings import Settings
from preread.schemas.tables import ProcessRole, ProcessState, utcnow
from preread.worker.pipeline.heartbeat import HeartbeatWriter, recheck_requested
from preread.worker.pipeline.queues import INFER

log = logging.getLogger(__name__)

#: Seconds between looks for a recheck request while not ready.
NUDGE_POLL_S = 2.0

#: This worker's consumer, settings and heartbeat once it is up, and whether a readiness watcher runs.
_state: dict[str, Any] = {}
_state_lock = threading.Lock()


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
    with _state_lock:
        _state.update(beat=beat.start(), consumer=consumer, settings=settings, watching=INFER in queues)
    if INFER in queues:
        _watch(consumer, settings, beat, None)


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    with _state_lock:
        beat = _state.pop("beat", None)
        _state.pop("consumer", None)
    if beat is not None:
        beat.stop()


def pause_infer(reason: str) -> bool:
    """Stop taking infer tasks until the readiness check passes again; False where this process cannot pause.

    Called from an infer task whose token the API refused: the worker stops
    consuming the infer queue (prefetched tasks that still arrive find it
    paused and leave their study alone), marks its heartbeat not ready with
    ``reason``, logs it once, and starts the readiness watcher, which rechecks
    on its timer or at once on ``preread retry``. False in a process with no
    worker lifecycle (a prefork pool's child), which cannot reach the consumer.
    """
    with _state_lock:
        consumer, settings, beat = _state.get("consumer"), _state.get("settings"), _state.get("beat")
        if consumer is None or settings is None or beat is None:
            return False
        if _state.get("watching"):
            return True  # already paused (or not yet ready): the watcher says when it is ready again
        _state["watching"] = True
    consumer.call_soon(consumer.cancel_task_queue, INFER)
    log.error("not ready for infer: %s; infer tasks paused, studies wait in RENDERED", reason)
    beat.mark(ProcessState.NOT_READY, reason, model=settings.model, device=settings.device)
    _watch(consumer, settings, beat, reason)
    return True


def _watch(consumer: Any, settings: Settings, beat: HeartbeatWriter, known: str | None) -> None:
    """Run :func:`_wait_for_model` in a daemon thread."""
    threading.Thread(target=_wait_for_model, args=(consumer, settings, beat, known), name="preread-readiness",
                     daemon=True).start()


def _wait_for_model(consumer: Any, settings: Settings, beat: HeartbeatWriter, known: str | None = None) -> None:
    """Check readiness (model, device, token) until it passes, then consume the infer queue.

    ``known``: the problem already marked and logged (a paused worker), so the
    first check waits for the timer or ``preread retry`` and the same problem
    is not logged twice.
    """
    from preread.worker.inference.engine import readiness_problem

    said = known
    if known is not None:
        _sleep_until_recheck(settings, utcnow())
    while True:
        checked_at = utcnow()
        problem = readiness_problem(settings)
        if problem is None:
            from preread.worker.inference.engine import get_engine
            from preread.worker.inference.model import resolve_device
            from preread.worker.pipeline.gpus import worker_details

            device = str(resolve_device(settings.device))  # what "auto" became, for the log and `preread status`
            engine = get_engine(settings)  # loaded by the readiness check: this process's (threads pool) engine
            beat.refresh = lambda: worker_details(settings.model, device, engine)
            beat.mark(ProcessState.READY, None)
            with _state_lock:
                _state["watching"] = False
            consumer.call_soon(consumer.add_task_queue, INFER)
            log.info("model %s ready on %s: consuming the infer queue", settings.model, device)
            return
        if problem != said:
            log.error("not ready for infer: %s", problem)
            said = problem
        beat.mark(ProcessState.NOT_READY, problem, model=settings.model, device=settings.device)
        _sleep_until_recheck(settings, checked_at)


def _sleep_until_recheck(settings: Settings, checked_at: datetime) -> None:
    """Wait ``PREREAD_READINESS_RECHECK`` seconds, or less when ``preread retry`` asks after ``checked_at``."""
    deadline = time.monotonic() + settings.readiness_recheck
    while time.monotonic() < deadline:
        time.sleep(min(NUDGE_POLL_S, max(0.0, deadline - time.monotonic())))
        try:
            if recheck_requested(settings.effective_database_url, checked_at):
                log.info("recheck asked by preread retry")
                return
        except Exception:  # the database away: recheck on the timer
            pass

"""The coordinator loop: stability monitor, outbox dispatcher, reconciler and retention cleanup on one timer."""

from __future__ import annotations

import logging
import threading

from celery import Celery

from preread.schemas.settings import Settings
from preread.schemas.tables import ProcessRole, ProcessState
from preread.worker.pipeline.heartbeat import HeartbeatWriter
from preread.ingest.sweep.runner import run_sweeps_once
from preread.worker.pipeline.outbox import dispatch_once
from preread.worker.pipeline.reconciler import reconcile_once

log = logging.getLogger(__name__)

#: Reconcile every this many passes (it scans more than the dispatcher).
RECONCILE_EVERY = 10


def coordinate_once(settings: Settings, app: Celery, pass_no: int = 0) -> int:
    """One pass: mark quiet studies STABLE, publish the outbox, sometimes reconcile."""
    from preread.ingest.assembly.stability import run_once as mark_stable

    done = len(mark_stable(settings.effective_database_url, settings.stable_after))
    done += dispatch_once(settings, app)
    done += run_sweeps_once(settings)  # archive sweeps (ingest/sweep/runner.py)
    if pass_no % RECONCILE_EVERY == 0:
        done += reconcile_once(settings)
        if settings.retention_days is not None:  # daily, and whenever free space is under twice the watermark
            from preread.ingest.storage.retention import run_if_due

            run_if_due(settings)
    # Results-out hook (worker/exporters, issue 14): plan deliveries of new reports and start
    # sending what is due, one thread per destination; returns without waiting for them.
    if settings.export_enabled:
        from preread.worker.exporters.deliveries import deliver_due

        done += deliver_due(settings)
    return done


def coordinate_forever(settings: Settings, app: Celery, stop: threading.Event) -> None:
    """Run passes until ``stop`` is set, with a heartbeat; a failing pass is logged and retried, never fatal."""
    beat = HeartbeatWriter(settings.effective_database_url, ProcessRole.COORDINATOR, state=ProcessState.READY).start()
    pass_no = 0
    try:
        while not stop.is_set():
            try:
                coordinate_once(settings, app, pass_no)
            except Exception as exc:  # database or broker briefly away: try again next pass
                log.warning("coordinator pass failed: %s: %s", type(exc).__name__, exc)
            pass_no += 1
            stop.wait(settings.dispatch_interval)
    finally:
        beat.stop()

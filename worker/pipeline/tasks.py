"""Celery tasks: one per pipeline step, each taking only a study id.

Following Celery's task guidance: tasks are idempotent (a step's result
commits only if the study is still in the state the step expects), acknowledged
late and rejected back to the queue if the worker dies, retried with
exponential backoff and jitter for transient errors, and never retried for bad
input (the study goes FAILED with its reason).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, cast

from celery import Task
from celery.signals import worker_process_init, worker_ready
from sqlalchemy import CursorResult, update
from sqlalchemy.exc import DBAPIError, OperationalError

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Study, StudyState
from preread.worker.pipeline.celery_app import EXPORT, INFER, app
from preread.worker.pipeline.stages import (
    EXPORTABLE,
    INFERABLE,
    RENDERABLE,
    BadInput,
    StepOutcome,
    Superseded,
    infer_step,
    render_step,
    set_state,
)

log = logging.getLogger(__name__)

#: Errors worth another try: the database, the broker or the disk hiccupped.
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, DBAPIError, ConnectionError, TimeoutError)
try:  # the broker clients' own connection errors
    import redis.exceptions as _redis_exc
    from kombu.exceptions import OperationalError as _KombuOperationalError

    TRANSIENT += (_redis_exc.ConnectionError, _redis_exc.TimeoutError, _KombuOperationalError)
except ImportError:  # pragma: no cover
    pass

RETRY_BASE_S = 2.0
RETRY_MAX_S = 120.0
MAX_RETRIES = 8
MIN_PIXELS_ON_OOM = 64 * 28 * 28


def backoff(retries: int) -> float:
    """Exponential backoff with full jitter, capped."""
    return random.uniform(0.5, 1.0) * min(RETRY_MAX_S, RETRY_BASE_S * (2**retries))


def _settings() -> Settings:
    return app.conf.preread_settings


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _begin_attempt(settings: Settings, study_id: int, expect: tuple[StudyState, ...]) -> bool:
    """Count an attempt on a study still waiting for this step; False for a delivery it has outgrown.

    A duplicate delivery (the reconciler's re-enqueue, a redelivered message)
    that finds the study already moved on is not an attempt: counting it would
    make a study that failed once look retried.
    """
    with session_scope(settings.effective_database_url) as session:
        counted = cast(CursorResult[Any], session.execute(
            update(Study)
            .where(Study.id == study_id, Study.state.in_([str(s) for s in expect]))
            .values(attempts=Study.attempts + 1)
        )).rowcount
    return bool(counted)


def _fail(settings: Settings, study_id: int, reason: str) -> None:
    with session_scope(settings.effective_database_url) as session:
        set_state(session, study_id, StudyState.FAILED, error=reason[:2000])
    log.error("study %s FAILED: %s", study_id, reason)


def _hand_off(settings: Settings) -> None:
    """Publish the outbox row the step just committed, without waiting for the dispatcher."""
    from preread.worker.pipeline.outbox import dispatch_once

    try:
        dispatch_once(settings, app, limit=20)
    except Exception as exc:  # the dispatcher loop will publish it
        log.info("fast hand-off deferred to the dispatcher: %s", type(exc).__name__)


def run_step(task: Task, study_id: int, step: Callable[[], StepOutcome], expect: tuple[StudyState, ...]) -> str:
    """Run a pipeline step on a study in one of the ``expect`` states, with the shared retry and failure policy."""
    settings = _settings()
    try:
        if not _begin_attempt(settings, study_id, expect):
            log.info("study %s: nothing to do (not %s)", study_id, "/".join(str(s) for s in expect))
            return "superseded"
        outcome = step()
    except Superseded as exc:
        log.info("study %s: nothing to do (%s)", study_id, exc)
        return "superseded"
    except BadInput as exc:
        _fail(settings, study_id, str(exc))
        return "failed"
    except TRANSIENT as exc:
        if task.request.retries >= MAX_RETRIES:
            _fail(settings, study_id, f"transient error persisted: {type(exc).__name__}")
            return "failed"
        log.warning("study %s: transient %s, retry %d", study_id, type(exc).__name__, task.request.retries + 1)
        raise task.retry(exc=exc, countdown=backoff(task.request.retries), max_retries=MAX_RETRIES) from None
    _hand_off(settings)
    return str(outcome.state)


@app.task(name="preread.render_study", bind=True, acks_late=True, reject_on_worker_lost=True)
def render_study(self: Task, study_id: int) -> str:
    """Render a STABLE study to PNGs and a manifest, then hand it to the infer queue."""
    settings = _settings()
    return run_step(self, study_id, lambda: render_step(settings, study_id, handoff=INFER), RENDERABLE)


@app.task(name="preread.infer_study", bind=True, acks_late=True, reject_on_worker_lost=True)
def infer_study(self: Task, study_id: int, max_pixels: int | None = None) -> str:
    """Probe and draft a RENDERED study on this worker's model."""
    from preread.worker.inference.engine import get_engine

    settings = _settings()
    if max_pixels is not None:
        settings = settings.model_copy(update={"max_pixels": max_pixels, "min_pixels": min(settings.min_pixels, max_pixels)})
    try:
        engine = get_engine(settings)
        return run_step(self, study_id, lambda: infer_step(settings, study_id, engine, handoff=_export_topic(settings)), INFERABLE)
    except Exception as exc:
        if not _is_cuda_oom(exc):
            raise
        smaller = max(MIN_PIXELS_ON_OOM, settings.max_pixels // 2)
        if smaller == settings.max_pixels:
            _fail(settings, study_id, "CUDA out of memory at the smallest pixel budget")
            return "failed"
        log.warning("study %s: CUDA out of memory, retrying with max_pixels=%d", study_id, smaller)
        import torch

        torch.cuda.empty_cache()
        raise self.retry(kwargs={"study_id": study_id, "max_pixels": smaller}, countdown=1, max_retries=MAX_RETRIES) from None


def _export_topic(settings: Settings) -> str | None:
    """Hand drafted studies to the export queue only where an exporter is configured."""
    return EXPORT if settings.export_enabled else None


@app.task(name="preread.export_study", bind=True, acks_late=True, reject_on_worker_lost=True)
def export_study(self: Task, study_id: int) -> str:
    """Push a DRAFTED study's current report to the configured destinations."""
    from preread.worker.exporters.step import export_step

    settings = _settings()
    return run_step(self, study_id, lambda: export_step(settings, study_id), EXPORTABLE)


def _warm_model(**_: Any) -> None:
    """Load the model once per worker process, before the first task, if this worker serves ``infer``."""
    import os

    if INFER not in os.environ.get("PREREAD_WORKER_QUEUES", ""):
        return
    from preread.worker.inference.engine import get_engine

    get_engine(_settings())
    log.info("model loaded for the infer queue")


worker_process_init.connect(_warm_model)
worker_ready.connect(_warm_model)

"""Celery tasks: one per pipeline step, each taking only a study id.

Following Celery's task guidance: tasks are idempotent (a step's result
commits only if the study is still in the state the step expects), acknowledged
late and rejected back to the queue if the worker dies, and retried by Celery
itself (``autoretry_for`` with exponential backoff and jitter) for transient
errors, never for bad input. Each stage counts its own attempts on the study
(a retry is an attempt; a delivery that finds the study moved on is not) and
stops at ``PREREAD_MAX_ATTEMPTS``: render and infer end FAILED with the stage
and reason; export never turns a finished draft FAILED: each destination's
failure lives on its delivery row, retried by the coordinator. Only the CUDA out-of-memory path retries by hand,
with a smaller pixel budget. A step that finds the worker itself unfit (its
PREREAD_WORKER_TOKEN refused: :class:`WorkerNotReady`) is no attempt: the study
stays where it was and the worker stops taking that queue until it is fixed
(``lifecycle.pause_infer``); the reconciler re-enqueues the study once a ready
worker is seen.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, cast

from celery import Task
from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Study, StudyState
from preread.worker.pipeline import lifecycle  # also hooks the worker's heartbeat, readiness and signals into Celery
from preread.worker.pipeline.celery_app import EXPORT, INFER, RENDER, app
from preread.worker.pipeline.stages import (
    EXPORTABLE,
    INFERABLE,
    RENDERABLE,
    BadInput,
    StepOutcome,
    Superseded,
    WorkerNotReady,
    infer_step,
    render_step,
    set_state,
)

log = logging.getLogger(__name__)

#: Errors worth another try: the database, the broker, the disk or a destination hiccupped.
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, DBAPIError, ConnectionError, TimeoutError)
try:  # the broker clients' own connection errors
    import redis.exceptions as _redis_exc
    from kombu.exceptions import OperationalError as _KombuOperationalError

    TRANSIENT += (_redis_exc.ConnectionError, _redis_exc.TimeoutError, _KombuOperationalError)
except ImportError:  # pragma: no cover
    pass

#: Celery's own ceiling on retries, for errors met before an attempt could be counted (the database away).
MAX_RETRIES = 8
MIN_PIXELS_ON_OOM = 64 * 28 * 28
#: Set once a process without a worker lifecycle has logged why it cannot pause its infer queue (said once).
_said_unpausable = threading.Event()


def _settings() -> Settings:
    settings: Settings = app.conf.preread_settings
    return settings


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _begin_attempt(settings: Settings, study_id: int, expect: tuple[StudyState, ...]) -> int:
    """Count an attempt on a study still waiting for this step; its number, or 0 for a delivery it has outgrown.

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
        if not counted:
            return 0
        return int(session.execute(select(Study.attempts).where(Study.id == study_id)).scalar_one())


def _uncount_attempt(settings: Settings, study_id: int, expect: tuple[StudyState, ...]) -> None:
    """Take back the attempt :func:`_begin_attempt` counted: the step never really began on the study."""
    with session_scope(settings.effective_database_url) as session:
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.state.in_([str(s) for s in expect]), Study.attempts > 0)
            .values(attempts=Study.attempts - 1)
        )


def _worker_not_ready(settings: Settings, study_id: int, expect: tuple[StudyState, ...], reason: str) -> None:
    """The worker, not the study, is at fault: pause this worker's infer queue and leave the study as it was."""
    if not lifecycle.pause_infer(reason) and not _said_unpausable.is_set():
        _said_unpausable.set()
        log.error("not ready for infer: %s; this process cannot pause its infer queue (run the infer worker with "
                  "the default threads pool), so studies it takes wait in RENDERED until it is fixed", reason)
    _uncount_attempt(settings, study_id, expect)
    log.info("study %s: left %s for a ready worker", study_id, "/".join(str(s) for s in expect))


def give_up(settings: Settings, study_id: int, stage: str, reason: str) -> None:
    """The stage has failed for good: FAILED with the stage and reason, except that export keeps the draft."""
    if stage == EXPORT:
        # A finished draft stays DRAFTED: the coordinator's deliver_due plans and retries its deliveries,
        # whose rows carry each destination's reason (``preread status``).
        log.error("study %s: the export task gave up (%s); the draft stays DRAFTED for the coordinator's deliveries",
                  study_id, reason)
        return
    with session_scope(settings.effective_database_url) as session:
        set_state(session, study_id, StudyState.FAILED, error=f"{stage}: {reason}"[:2000])
    log.error("study %s FAILED in %s: %s", study_id, stage, reason)


def _hand_off(settings: Settings) -> None:
    """Publish the outbox row the step just committed, without waiting for the dispatcher."""
    from preread.worker.pipeline.outbox import dispatch_once

    try:
        dispatch_once(settings, app, limit=20)
    except Exception as exc:  # the dispatcher loop will publish it
        log.info("fast hand-off deferred to the dispatcher: %s", type(exc).__name__)


class PipelineTask(Task):
    """A pipeline step: late acks, declared retries for transient errors, bad input never retried."""

    abstract = True
    stage = RENDER
    acks_late = True
    reject_on_worker_lost = True
    autoretry_for = TRANSIENT
    dont_autoretry_for = (BadInput, Superseded, WorkerNotReady)
    retry_backoff = 2
    retry_backoff_max = 120
    retry_jitter = True
    max_retries = MAX_RETRIES

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any) -> None:
        """Retries ran out, or an error no retry can mend: the study does not wait silently."""
        study_id = kwargs.get("study_id", args[0] if args else None)
        if study_id is None:
            return
        kind = "transient error persisted" if isinstance(exc, TRANSIENT) else "error"
        try:
            give_up(_settings(), int(study_id), self.stage, f"{kind}: {type(exc).__name__}: {str(exc)[:300]}")
        except Exception as again:  # the database is still away: the reconciler takes it from here
            log.error("study %s: could not record the failure (%s)", study_id, type(again).__name__)


def run_step(task: PipelineTask, study_id: int, step: Callable[[], StepOutcome], expect: tuple[StudyState, ...]) -> str:
    """Run a pipeline step on a study in one of the ``expect`` states, counting the attempt."""
    settings = _settings()
    attempt = _begin_attempt(settings, study_id, expect)
    if not attempt:
        log.info("study %s: nothing to do (not %s)", study_id, "/".join(str(s) for s in expect))
        return "superseded"
    try:
        outcome = step()
    except Superseded as exc:
        log.info("study %s: nothing to do (%s)", study_id, exc)
        return "superseded"
    except WorkerNotReady as exc:
        _worker_not_ready(settings, study_id, expect, str(exc))
        return "not_ready"
    except BadInput as exc:
        give_up(settings, study_id, task.stage, str(exc))
        return "failed"
    except TRANSIENT as exc:
        if attempt >= settings.max_attempts:
            give_up(settings, study_id, task.stage,
                    f"transient error persisted after {attempt} attempts: {type(exc).__name__}: {str(exc)[:300]}")
            return "failed"
        log.warning("study %s: transient %s in %s, attempt %d of %d; Celery retries it",
                    study_id, type(exc).__name__, task.stage, attempt, settings.max_attempts)
        raise
    _hand_off(settings)
    return str(outcome.state)


@app.task(name="preread.render_study", bind=True, base=PipelineTask, stage=RENDER)
def render_study(self: PipelineTask, study_id: int) -> str:
    """Render a STABLE study to PNGs and a manifest, then hand it to the infer queue."""
    settings = _settings()
    return run_step(self, study_id, lambda: render_step(settings, study_id, handoff=INFER), RENDERABLE)


@app.task(name="preread.infer_study", bind=True, base=PipelineTask, stage=INFER)
def infer_study(self: PipelineTask, study_id: int, max_pixels: int | None = None) -> str:
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
            give_up(settings, study_id, INFER, "CUDA out of memory at the smallest pixel budget")
            return "failed"
        log.warning("study %s: CUDA out of memory, retrying with max_pixels=%d", study_id, smaller)
        import torch

        torch.cuda.empty_cache()
        raise self.retry(kwargs={"study_id": study_id, "max_pixels": smaller}, countdown=1) from None


def _export_topic(settings: Settings) -> str | None:
    """Hand drafted studies to the export queue only where an exporter is configured."""
    return EXPORT if settings.export_enabled else None


@app.task(name="preread.export_study", bind=True, base=PipelineTask, stage=EXPORT)
def export_study(self: PipelineTask, study_id: int) -> str:
    """Push a DRAFTED study's current report to the configured destinations."""
    from preread.worker.exporters.step import export_step

    settings = _settings()
    return run_step(self, study_id, lambda: export_step(settings, study_id), EXPORTABLE)

"""The pipeline's steps on one study: render, then infer.

Each step reads its inputs from the database, does its work, and writes its
results and the study's next state in one transaction. Steps are idempotent:
running one twice leaves one current result. The Celery tasks and the
in-process ``preread draft`` both call these.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

if TYPE_CHECKING:  # the engine imports torch: only the step that needs it imports it
    from preread.worker.inference.engine import Engine, StudyContext

from preread.ingest.storage.retention import FilesRemoved, check_files_present
from preread.schemas.database import session_scope
from preread.worker.pipeline.gpus import DRAFTS
from preread.schemas.settings import Settings
from preread.schemas.tables import Image, Instance, Outbox, Report, Series, Study, StudyState, utcnow

log = logging.getLogger(__name__)

#: The state each step starts from. A step whose study has moved on (a duplicate
#: delivery, or a re-opened study) commits nothing: that is what makes it idempotent.
#: Reprocessing a finished study puts it back to STABLE first.
RENDERABLE = (StudyState.STABLE,)
INFERABLE = (StudyState.RENDERED,)
EXPORTABLE = (StudyState.DRAFTED,)


class BadInput(Exception):
    """The study cannot be processed as it is; retrying will not help."""


class Superseded(Exception):
    """The study changed state (re-opened, or already done) while the step ran."""


class WorkerNotReady(Exception):
    """This worker cannot do the step as it is configured (its token refused): the study waits, the worker pauses.

    The message is one line naming the setting and the fix; it becomes the
    worker's not-ready reason, never the study's error.
    """


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What a step did, for logs, the CLI and the next hand-off."""

    study_id: int
    state: StudyState
    priority: int = 0
    detail: str = ""


def set_state(
    session: Session,
    study_id: int,
    state: StudyState,
    *,
    expect: tuple[StudyState, ...] | None = None,
    error: str | None = None,
    handoff: str | None = None,
    priority: int = 0,
) -> bool:
    """Move a study to ``state`` (only from ``expect`` when given), optionally with an outbox row.

    The outbox row is written in the same transaction, so the hand-off to the
    next queue happens exactly when the state change commits.
    """
    stmt = update(Study).where(Study.id == study_id)
    if expect is not None:
        stmt = stmt.where(Study.state.in_([str(s) for s in expect]))
    values: dict[str, object] = {"state": str(state), "state_changed_at": utcnow(), "updated_at": utcnow()}
    if error is not None or state != StudyState.FAILED:
        values["error"] = error
    if state != StudyState.FAILED:
        values["attempts"] = 0  # attempts count per stage
    changed = cast(CursorResult[Any], session.execute(stmt.values(**values))).rowcount
    if changed and handoff:
        session.add(Outbox(study_id=study_id, topic=handoff, priority=priority, payload={"study_id": study_id}))
    return bool(changed)


def study_files(session: Session, study_id: int) -> list[Path]:
    """The stored files of a study, in a stable order."""
    rows = session.execute(
        select(Instance.path)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .order_by(Series.series_number, Instance.instance_number, Instance.id)
    ).scalars()
    return [Path(p) for p in rows]


def study_in_state(session: Session, study_id: int, allowed: tuple[StudyState, ...]) -> Study:
    """The study a step works on; BadInput if it is gone, Superseded if it has moved on."""
    study = session.get(Study, study_id)
    if study is None:
        raise BadInput(f"study {study_id} does not exist")
    if study.state not in allowed:
        raise Superseded(f"study {study_id} is {study.state}")
    return study


def render_step(settings: Settings, study_id: int, *, handoff: str | None = "infer") -> StepOutcome:
    """Render the study's chosen frames to PNGs with a manifest; the study becomes RENDERED."""
    from preread.ingest.render import RenderError, render_study, store_images

    url = settings.effective_database_url
    with session_scope(url) as session:
        study = study_in_state(session, study_id, RENDERABLE)
        files = study_files(session, study_id)
        try:
            check_files_present(session, study_id, files)
        except FilesRemoved as exc:
            raise BadInput(str(exc)) from None
        study_uid = study.study_instance_uid
        priority = study.priority
    if not files:
        raise BadInput(f"study {study_id} has no stored instances")
    out_dir = settings.images_dir / study_uid
    started = time.perf_counter()
    try:
        rendering = render_study(
            files,
            out_dir,
            max_images=settings.max_images,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
        )
    except RenderError as exc:
        raise BadInput(f"nothing renderable: {exc}") from exc
    elapsed = time.perf_counter() - started
    with session_scope(url) as session:
        if not set_state(session, study_id, StudyState.RENDERED, expect=RENDERABLE, handoff=handoff, priority=priority):
            raise Superseded(f"study {study_id} changed state while rendering")
        store_images(session, study_id, rendering)
    for path, reason in rendering.errors:
        log.warning("study %s: skipped %s: %s", study_uid, path.name, reason)
    log.info("study %s rendered: %d images in %.2fs", study_uid, len(rendering.images), elapsed)
    return StepOutcome(study_id, StudyState.RENDERED, priority, f"{len(rendering.images)} images")


def study_context(session: Session, study: Study) -> StudyContext:
    """What the prompt may know of a study: never a name or an ID."""
    from preread.worker.inference.engine import StudyContext

    modality = (study.modalities or "").split("\\")[0] or None
    return StudyContext(
        modality=modality,
        body_part=study.body_part,
        study_description=study.study_description,
        patient_age=study.patient_age,
        patient_sex=study.patient_sex,
    )


def infer_step(settings: Settings, study_id: int, engine: Engine, *, handoff: str | None = None) -> StepOutcome:
    """Probe and draft the rendered study; the study becomes DRAFTED with one current report."""
    from preread.worker.inference.engine import urgency_from_probes
    from preread.worker.inference.images import ImagesChanged, ImagesError, StoredImage, TokenRefused, study_images
    from preread.worker.results.store import save_draft, save_probes

    url = settings.effective_database_url
    with session_scope(url) as session:
        study = study_in_state(session, study_id, INFERABLE)
        stored = [
            StoredImage(image_id, Path(path))
            for image_id, path in session.execute(
                select(Image.id, Image.path).where(Image.study_id == study_id).order_by(Image.ordinal, Image.id)
            )
        ]
        ctx = study_context(session, study)
        study_uid = study.study_instance_uid
        requested_rank = study.priority
    if not stored:
        raise BadInput(f"study {study_id} has no rendered images")
    try:  # the data dir's PNGs, or PREREAD_IMAGES_URL's fetched into this host's (worker/inference/images.py)
        with study_images(settings, study_uid, stored) as images:
            probes = engine.probe(images, ctx)
            draft = engine.draft(images, ctx)
    except ImagesChanged as exc:
        raise Superseded(f"study {study_id}: {exc}") from None
    except TokenRefused as exc:  # the worker's token, not the study: it waits in RENDERED while the worker pauses
        raise WorkerNotReady(str(exc)) from None
    except ImagesError as exc:  # images gone, an answer that is not ours: no retry mends it (unreachable is transient)
        raise BadInput(str(exc)) from None
    urgency = urgency_from_probes(probes, settings.priority_threshold, settings.stat_threshold)
    if draft.report is not None and draft.report.urgency.rank > urgency.rank:
        urgency = draft.report.urgency
    with session_scope(url) as session:
        if not set_state(session, study_id, StudyState.DRAFTED, expect=INFERABLE, handoff=handoff):
            raise Superseded(f"study {study_id} changed state while drafting")
        save_probes(session, study_id, probes, draft.model_id)
        save_draft(session, study_id, draft)
        session.execute(update(Study).where(Study.id == study_id).values(urgency=str(urgency), priority=max(requested_rank, urgency.rank)))
    DRAFTS.record()  # drafts per minute in this worker's heartbeat (worker/pipeline/gpus.py)
    log.info(
        "study %s drafted: parse=%s urgency=%s tokens=%s",
        study_uid,
        draft.parse_status,
        urgency,
        draft.completion_tokens,
    )
    return StepOutcome(study_id, StudyState.DRAFTED, urgency.rank, str(draft.parse_status))


def current_report(session: Session, study_id: int) -> Report | None:
    """The study's current report, if any."""
    return session.execute(
        select(Report).where(Report.study_id == study_id, Report.current.is_(True))
    ).scalar_one_or_none()

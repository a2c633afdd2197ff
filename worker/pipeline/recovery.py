"""Recovery: put studies back at the right stage (``preread retry``), idempotently.

A FAILED study goes back to the stage it failed in (its error names it:
``render: …`` or ``infer: …``), or to the one ``--stage`` names; a study that
is still waiting gets its hand-off again unless one is already in flight.
Attempts start again at 0, and not-ready infer workers are asked to check
their model again at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import exists, func, or_, select, update

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Image, Outbox, Study, StudyState, utcnow
from preread.worker.pipeline.heartbeat import request_recheck
from preread.worker.pipeline.queues import INFER, RENDER

log = logging.getLogger(__name__)

#: The state a study waits in for each stage.
STATE_FOR_STAGE = {RENDER: StudyState.STABLE, INFER: StudyState.RENDERED}


@dataclass(frozen=True, slots=True)
class Retried:
    """What ``preread retry`` did to one study."""

    study_uid: str
    was: str
    stage: str | None
    note: str


def _stage_for(study: Study, has_images: bool, asked: str | None) -> tuple[str | None, str]:
    """The stage a study goes back to, or None with why it is left alone."""
    if asked == INFER and not has_images:
        return RENDER, "no rendered images: back to render"
    if asked:
        return asked, ""
    state = StudyState(study.state)
    if state == StudyState.STABLE:
        return RENDER, ""
    if state == StudyState.RENDERED:
        return INFER, ""
    if state == StudyState.FAILED:
        failed_in = (study.error or "").split(":", 1)[0]
        if failed_in == INFER and has_images:
            return INFER, ""
        return RENDER, ""
    return None, f"left alone: {state} (pass --stage render|infer to do it again)"


def retry_studies(settings: Settings, uids: list[str], state: StudyState | None, stage: str | None) -> tuple[list[Retried], list[str]]:
    """Put the chosen studies back at their stage now; returns what was done and the UIDs not found."""
    url = settings.effective_database_url
    now = utcnow()
    recent = now - timedelta(seconds=settings.reconcile_after)
    done: list[Retried] = []
    with session_scope(url) as session:
        query = select(Study)
        if uids:
            query = query.where(Study.study_instance_uid.in_(uids))
        if state is not None:
            query = query.where(Study.state == str(state))
        studies = session.scalars(query.order_by(Study.id)).all()
        missing = sorted(set(uids) - {s.study_instance_uid for s in studies})
        for study in studies:
            has_images = bool(session.execute(select(func.count()).select_from(Image).where(Image.study_id == study.id)).scalar_one())
            target, note = _stage_for(study, has_images, stage)
            if target is None:
                done.append(Retried(study.study_instance_uid, study.state, None, note))
                continue
            waiting_in = STATE_FOR_STAGE[target]
            in_flight = session.execute(
                select(exists().where(Outbox.study_id == study.id, Outbox.topic == target,
                                      or_(Outbox.sent_at.is_(None), Outbox.sent_at >= recent)))
            ).scalar_one()
            if study.state == waiting_in and in_flight:
                done.append(Retried(study.study_instance_uid, study.state, target, "already queued"))
                continue
            was = study.state
            session.execute(update(Study).where(Study.id == study.id).values(
                state=str(waiting_in), state_changed_at=now, updated_at=now, attempts=0, error=None))
            session.add(Outbox(study_id=study.id, topic=target, priority=study.priority,
                               payload={"study_id": study.id, "retried": True}))
            done.append(Retried(study.study_instance_uid, was, target, note or "queued"))
    asked = request_recheck(url)
    if asked:
        log.info("asked %d not-ready worker(s) to check their model again", asked)
    if any(r.note in ("queued",) or r.note.startswith("no rendered") for r in done):
        from preread.worker.pipeline.outbox import OutboxPublisher

        try:
            OutboxPublisher(settings)()
        except Exception as exc:  # the broker away: the coordinator publishes them
            log.warning("hand-offs saved, not yet published (%s); the coordinator publishes them", type(exc).__name__)
    return done, missing

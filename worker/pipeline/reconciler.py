"""The reconciler: nothing stays stuck when a broker or a worker loses a message.

A study that has sat in STABLE or RENDERED longer than ``reconcile_after``
with no hand-off pending, and none published within ``reconcile_after``,
gets a new outbox row; one that has used up its
attempts is FAILED with the reason.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, exists, or_, select, update

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Outbox, Study, StudyState, utcnow
from preread.worker.pipeline.queues import INFER, RENDER

log = logging.getLogger(__name__)

#: The hand-off a study waits for in each state.
TOPIC_FOR_STATE = {StudyState.STABLE: RENDER, StudyState.RENDERED: INFER}


def reconcile_once(settings: Settings) -> int:
    """Re-enqueue stuck studies; returns how many were re-enqueued or failed."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.reconcile_after)
    touched = 0
    with session_scope(settings.effective_database_url) as session:
        # A hand-off still unsent, or sent so recently that a worker may not have taken it yet.
        pending = exists().where(Outbox.study_id == Study.id, or_(Outbox.sent_at.is_(None), Outbox.sent_at >= cutoff))
        stuck = session.execute(
            select(Study.id, Study.state, Study.attempts, Study.priority, Study.study_instance_uid)
            .where(Study.state.in_([str(s) for s in TOPIC_FOR_STATE]), Study.state_changed_at < cutoff, ~pending)
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        for study_id, state, attempts, priority, uid in stuck:
            touched += 1
            if attempts >= settings.max_attempts:
                session.execute(
                    update(Study)
                    .where(Study.id == study_id)
                    .values(state=StudyState.FAILED, state_changed_at=now, error=f"gave up in {state} after {attempts} attempts")
                )
                log.error("study %s FAILED: stuck in %s after %d attempts", uid, state, attempts)
                continue
            session.add(Outbox(study_id=study_id, topic=TOPIC_FOR_STATE[StudyState(state)], priority=priority, payload={"study_id": study_id, "reconciled": True}))
            session.execute(update(Study).where(Study.id == study_id).values(state_changed_at=now))
            log.warning("study %s re-enqueued: %s for over %.0fs", uid, state, settings.reconcile_after)
        session.execute(delete(Outbox).where(Outbox.sent_at.is_not(None), Outbox.sent_at < now - timedelta(days=7)))
    return touched

"""The reconciler: nothing stays stuck when a broker or a worker loses a message.

Every waiting state has its hand-off: STABLE waits for ``render`` and RENDERED
for ``infer``. A study that has waited longer than ``reconcile_after`` with no
hand-off pending, and none published within ``reconcile_after``, gets a new
outbox row. A study that has used up its attempts on render or infer is FAILED
with the stage and reason. RENDERED studies are not re-enqueued while no ready
infer worker has been seen: they wait, visibly (``preread status``), and go on
when one reports ready.

DRAFTED is not watched here: while an exporter is enabled the coordinator's
:func:`~preread.worker.exporters.deliveries.deliver_due` owns it on every pass. It
plans delivery rows for a DRAFTED study that has none (a lost export task, or a
draft made before the exporter was enabled), sends what is due, and re-sends a
row whose sender died once its lease runs out. Re-enqueueing the export task
would only race it. A drafted study is never FAILED by its export.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, exists, or_, select, update

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Outbox, Study, StudyState, utcnow
from preread.worker.pipeline.heartbeat import prune, ready_for, seen
from preread.worker.pipeline.queues import INFER, RENDER

log = logging.getLogger(__name__)

#: The hand-off a study waits for in each watched state (DRAFTED belongs to the deliveries).
TOPIC_FOR_STATE = {StudyState.STABLE: RENDER, StudyState.RENDERED: INFER}
#: The stage whose attempts a waiting state counts.
STAGE_FOR_STATE = {StudyState.STABLE: RENDER, StudyState.RENDERED: INFER}


def waiting_states(settings: Settings) -> list[StudyState]:
    """The states the reconciler watches (never DRAFTED: the coordinator's deliveries own it)."""
    return list(TOPIC_FOR_STATE)


def reconcile_once(settings: Settings) -> int:
    """Re-enqueue stuck studies; returns how many were re-enqueued or failed."""
    url = settings.effective_database_url
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.reconcile_after)
    watched = waiting_states(settings)
    if not ready_for(seen(url), INFER):
        watched.remove(StudyState.RENDERED)  # they wait for a ready infer worker, not for a lost message
    touched = 0
    with session_scope(url) as session:
        # A hand-off still unsent, or sent so recently that a worker may not have taken it yet.
        pending = exists().where(Outbox.study_id == Study.id, or_(Outbox.sent_at.is_(None), Outbox.sent_at >= cutoff))
        waiting = Study.state.in_([str(s) for s in watched])
        stuck = session.execute(
            select(Study.id, Study.state, Study.attempts, Study.priority, Study.study_instance_uid)
            .where(waiting, Study.state_changed_at < cutoff, ~pending)
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        for study_id, state, attempts, priority, uid in stuck:
            touched += 1
            stage = STAGE_FOR_STATE.get(StudyState(state))
            if stage is not None and attempts >= settings.max_attempts:
                session.execute(
                    update(Study)
                    .where(Study.id == study_id)
                    .values(state=StudyState.FAILED, state_changed_at=now,
                            error=f"{stage}: gave up in {state} after {attempts} attempts")
                )
                log.error("study %s FAILED: stuck in %s after %d attempts", uid, state, attempts)
                continue
            session.add(Outbox(study_id=study_id, topic=TOPIC_FOR_STATE[StudyState(state)], priority=priority,
                               payload={"study_id": study_id, "reconciled": True}))
            session.execute(update(Study).where(Study.id == study_id).values(state_changed_at=now))
            log.warning("study %s re-enqueued: %s for over %.0fs", uid, state, settings.reconcile_after)
        session.execute(delete(Outbox).where(Outbox.sent_at.is_not(None), Outbox.sent_at < now - timedelta(days=7)))
    prune(url)
    return touched

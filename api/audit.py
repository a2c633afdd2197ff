"""The audit trail: every view of a study, image or report, every feedback and reprocess, every PNG a worker fetched."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from preread.api.tokens import Principal
from preread.schemas.tables import AuditEvent


class Action(enum.StrEnum):
    """What was done."""

    WORKLIST = "view_worklist"
    SEARCH = "search"
    STUDY = "view_study"
    IMAGE = "view_image"
    FEEDBACK = "feedback"
    REPROCESS = "reprocess"
    #: A remote infer worker fetched a PNG to draft from (``api/worker_images.py``): not a radiologist's view.
    WORKER_IMAGE = "worker_fetch_image"


#: Actions that only read: their audit rows may skip the commit's flush wait.
VIEWS = frozenset({Action.WORKLIST, Action.SEARCH, Action.STUDY, Action.IMAGE, Action.WORKER_IMAGE})


def record(
    session: Session,
    principal: Principal,
    action: Action,
    *,
    study_uid: str | None = None,
    client: str | None = None,
    detail: str | None = None,
) -> None:
    """Add one audit event to the request's transaction (no patient name or ID in ``detail``).

    A view's event does not wait for the WAL flush on Postgres (it survives a killed API,
    not a crashed database server); feedback and reprocess commit fully durably.
    """
    if action in VIEWS and session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    session.add(
        AuditEvent(
            token_name=principal.name,
            action=str(action),
            study_instance_uid=study_uid,
            client=(client or "")[:64] or None,
            detail=detail[:255] if detail else None,
        )
    )


def events_since(session: Session, since: datetime, limit: int = 10000) -> list[AuditEvent]:
    """Audit events at or after ``since``, oldest first."""
    return list(
        session.scalars(select(AuditEvent).where(AuditEvent.at >= since).order_by(AuditEvent.at, AuditEvent.id).limit(limit))
    )

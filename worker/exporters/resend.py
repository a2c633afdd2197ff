"""Sending drafts again on request (``preread export``): chosen by UID or date, one study at a time."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Report, Study, StudyState
from preread.worker.exporters.step import RESENDABLE, export_step, record_export_failure
from preread.worker.pipeline.stages import BadInput, Superseded


def drafts_to_send(settings: Settings, uids: list[str], since: datetime | None) -> tuple[list[tuple[int, str]], list[str]]:
    """(study id, UID) of the drafts chosen, and the UIDs that have none.

    By UID or ``since``: DRAFTED and EXPORTED studies (sent again); neither:
    every DRAFTED study, which includes drafts made before an exporter was on.
    """
    with session_scope(settings.effective_database_url) as session:
        query = select(Study.id, Study.study_instance_uid).join(Report, (Report.study_id == Study.id) & Report.current.is_(True))
        if uids:
            query = query.where(Study.study_instance_uid.in_(uids))
        if since is not None:
            query = query.where(Report.created_at >= since)
        states = RESENDABLE if (uids or since is not None) else (StudyState.DRAFTED,)
        rows = [(int(i), str(u)) for i, u in session.execute(query.where(Study.state.in_([str(s) for s in states])).order_by(Study.id))]
    missing = sorted(set(uids) - {uid for _, uid in rows})
    return rows, missing


def export_again(settings: Settings, uids: list[str], since: datetime | None,
                 destinations: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Send each chosen draft; returns (UID, None or why it failed) per study, and the UIDs with no draft."""
    rows, missing = drafts_to_send(settings, uids, since)
    results: list[tuple[str, str | None]] = []
    for study_id, uid in rows:
        try:
            export_step(settings, study_id, destinations=destinations, resend=True)
        except (ConnectionError, TimeoutError, OSError, BadInput) as exc:
            record_export_failure(settings, study_id, str(exc))
            results.append((uid, str(exc)))
            continue
        except Superseded as exc:
            results.append((uid, f"changed meanwhile ({exc})"))
            continue
        results.append((uid, None))
    return results, missing

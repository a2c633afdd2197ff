"""What the pipeline is doing now: studies per state, queue depths, recent failures, delivery problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState, Outbox, Report, Study, StudyState
from preread.worker.pipeline.heartbeat import Seen, ready_for, seen, warnings
from preread.worker.pipeline.queues import INFER, QUEUES

#: What RENDERED studies wait for while no infer worker has its model loaded.
NO_READY_INFER = "no ready infer worker"


@dataclass
class Failure:
    """A FAILED study and why (no patient data)."""

    study_uid: str
    error: str
    at: datetime


@dataclass
class DeliveryTrouble:
    """One destination with deliveries that failed or are being retried (from the ``deliveries`` table)."""

    destination: str
    #: Deliveries of current reports not finished yet (pending, sending, awaiting commitment).
    pending: int
    #: Deliveries given up on (too old, refused, not committed).
    failed: int
    last_error: str
    at: datetime | None


@dataclass
class PipelineStatus:
    """A snapshot for ``preread status`` and the live display of ``preread run``."""

    states: dict[str, int] = field(default_factory=dict)
    queues: dict[str, int | None] = field(default_factory=dict)
    outbox_pending: int = 0
    failures: list[Failure] = field(default_factory=list)
    #: Destinations whose deliveries failed or are retrying; the drafts stay DRAFTED meanwhile.
    export_failures: list[DeliveryTrouble] = field(default_factory=list)
    processes: list[Seen] = field(default_factory=list)
    #: Plain-word lines on what is missing (no coordinator, no ready worker of a queue ...).
    warnings: list[str] = field(default_factory=list)
    #: Why studies in a state are not moving, e.g. {"RENDERED": "no ready infer worker"}.
    waiting: dict[str, str] = field(default_factory=dict)


def queue_depths(app: Celery) -> dict[str, int | None]:
    """Messages waiting per queue, or None where the broker cannot be asked."""
    depths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            for name in QUEUES:
                try:
                    depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
                except Exception:
                    depths[name] = None
    except Exception:
        depths = {name: None for name in QUEUES}
    return depths


#: Delivery states that are not finished yet.
OPEN = {str(DeliveryState.PENDING), str(DeliveryState.SENDING), str(DeliveryState.UNCONFIRMED)}


def delivery_troubles(session: Session) -> list[DeliveryTrouble]:
    """Per destination with a failed delivery or an open one that has met an error: counts and the last error."""
    from preread.worker.exporters.deliveries import summary

    counts: dict[str, dict[str, int]] = {}
    for destination, state, n in summary(session):
        counts.setdefault(destination, {})[state] = n
    last: dict[str, tuple[str, datetime]] = {}
    rows = session.execute(
        select(Delivery.destination, Delivery.last_error, Delivery.updated_at)
        .join(Report, Report.id == Delivery.report_id)
        .where(Report.current.is_(True), Delivery.last_error.is_not(None))
        .order_by(Delivery.updated_at.desc())
    ).all()
    for destination, error, at in rows:
        last.setdefault(destination, (error or "", at))
    troubles = []
    for destination, by_state in sorted(counts.items()):
        pending = sum(n for state, n in by_state.items() if state in OPEN)
        failed = by_state.get(str(DeliveryState.FAILED), 0)
        if not failed and destination not in last:
            continue  # delivered, or waiting for its first attempt: no problem to show
        error, when = last[destination] if destination in last else ("", None)
        troubles.append(DeliveryTrouble(destination, pending, failed, error, when))
    return troubles


def snapshot(settings: Settings, app: Celery | None = None, *, failures: int = 5) -> PipelineStatus:
    """Read the pipeline's state from the database (and the broker when given)."""
    status = PipelineStatus(states={str(s): 0 for s in StudyState})
    with session_scope(settings.effective_database_url) as session:
        for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)):
            status.states[state] = count
        status.outbox_pending = session.execute(
            select(func.count()).select_from(Outbox).where(Outbox.sent_at.is_(None))
        ).scalar_one()
        rows = session.execute(
            select(Study.study_instance_uid, Study.error, Study.state_changed_at)
            .where(Study.state == StudyState.FAILED)
            .order_by(Study.state_changed_at.desc())
            .limit(failures)
        ).all()
        status.failures = [Failure(uid, err or "", at) for uid, err, at in rows]
        status.export_failures = delivery_troubles(session)
    status.processes = seen(settings.effective_database_url)
    status.warnings = warnings(status.processes, QUEUES, need_export=settings.export_enabled)
    if status.states.get(str(StudyState.RENDERED)) and not ready_for(status.processes, INFER):
        status.waiting[str(StudyState.RENDERED)] = NO_READY_INFER
    if app is not None:
        status.queues = queue_depths(app)
    return status

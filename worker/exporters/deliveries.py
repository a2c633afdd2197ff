"""Deliveries: one row per (report, destination), sent when due, each destination on its own.

The coordinator calls :func:`deliver_due` every pass. It plans rows for new current reports
(a re-draft supersedes the older report's unsent rows), then hands each destination that has
something due to its own worker thread, unless that destination is still busy from an earlier
pass: a PACS that hangs or is down delays nothing else. A row is claimed by moving it to
``sending`` with ``next_attempt_at`` as a lease (a sender killed mid-send leaves a row that
becomes due again when the lease runs out; the SR's UIDs are derived, so a resend stores the
same instance). A failed send backs off exponentially, and so does every other due row of
that destination (it is down for all of them); after ``delivery_max_age`` the row is failed.
A study becomes EXPORTED when every delivery of its current report has finished.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from pydicom.uid import generate_uid
from sqlalchemy import CursorResult, and_, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState, Report, Study, StudyState, utcnow
from preread.worker.exporters.base import DeliveryError, PermanentDeliveryError, PreparingExporter, exporter_for
from preread.worker.exporters.context import ExportContext, ExportInputError, load_context
from preread.worker.exporters.destinations import Destination, destinations_from_settings

log = logging.getLogger(__name__)

#: A claimed row is ours for this margin plus three of the destination's timeouts (associate, store,
#: commit); after that a sender that died mid-send has lost it and another one sends it again.
LEASE_MARGIN_S = 10.0
DEFAULT_TIMEOUT_S = 30.0
#: First retry after this many seconds; doubles per attempt up to ``delivery_backoff_max``.
RETRY_BASE_S = 2.0
#: Most rows one destination sends per batch before it re-reads what is due.
BATCH = 50
#: States in which a delivery is finished for good.
FINISHED = (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.SUPERSEDED)
#: Study states whose current report is delivered.
DELIVERABLE = (StudyState.DRAFTED, StudyState.EXPORTED)


def plan(session: Session, destinations: Sequence[Destination], study_id: int | None = None, *,
         fill_missing: bool = False, study_ids: Sequence[int] | None = None) -> int:
    """Create rows for current reports that have none; supersede unsent rows of reports no longer current.

    ``fill_missing`` (``preread export``) also adds the destinations a report has no row for yet,
    e.g. one configured after the report was delivered elsewhere.
    """
    stmt = (
        select(Report.id, Report.study_id, Study.modalities, Study.urgency)
        .join(Study, Study.id == Report.study_id)
        .where(Report.current.is_(True))
    )
    # Each pass looks at DRAFTED studies only (few, indexed); ``preread export`` also at EXPORTED ones.
    states = DELIVERABLE if fill_missing else (StudyState.DRAFTED,)
    stmt = stmt.where(Study.state.in_([str(s) for s in states]))
    if not fill_missing:
        stmt = stmt.where(~exists().where(Delivery.report_id == Report.id))
    if study_id is not None:
        stmt = stmt.where(Report.study_id == study_id)
    if study_ids is not None:
        stmt = stmt.where(Report.study_id.in_(list(study_ids)))
    created = 0
    for report_id, sid, modalities, urgency in session.execute(stmt).all():
        have = set(session.execute(select(Delivery.destination).where(Delivery.report_id == report_id)).scalars())
        wanted = [d for d in destinations if d.name not in have and d.wants(modalities, urgency)]
        for dest in wanted:
            try:
                with session.begin_nested():  # another planner (a second coordinator, the export task) may win
                    session.add(Delivery(report_id=report_id, study_id=sid, destination=dest.name, kind=dest.kind))
                created += 1
            except IntegrityError:
                pass
        if not wanted and not have:  # no destination wants this study: nothing to deliver, it is done
            _finish_study(session, sid)
        session.execute(
            update(Delivery)
            .where(Delivery.study_id == sid, Delivery.report_id != report_id,
                   Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]))
            .values(state=DeliveryState.SUPERSEDED, updated_at=utcnow())
        )
    session.flush()
    return created


def _due(now: datetime) -> Any:
    return and_(
        Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]),
        Delivery.next_attempt_at <= now,
    )


def lease_s(dest: Destination) -> float:
    """How long a claimed row of ``dest`` stays ours."""
    return LEASE_MARGIN_S + 3 * float(getattr(dest, "timeout", DEFAULT_TIMEOUT_S))


def _claim(session: Session, delivery_id: int, lease: float, commitment_uid: str | None = None) -> bool:
    """Take a due row for this sender; with Storage Commitment, record the transaction before asking for it."""
    now = utcnow()
    values: dict[str, object] = {"state": DeliveryState.SENDING, "next_attempt_at": now + timedelta(seconds=lease),
                                 "updated_at": now}
    if commitment_uid is not None:
        values["commitment_uid"] = commitment_uid
    result = cast(CursorResult[Any], session.execute(update(Delivery).where(Delivery.id == delivery_id, _due(now)).values(**values)))
    claimed = result.rowcount
    return bool(claimed)


def backoff_s(attempts: int, settings: Settings) -> float:
    """Seconds before the next attempt after ``attempts`` failures: exponential, capped, jittered."""
    return float(random.uniform(0.75, 1.0) * min(settings.delivery_backoff_max, RETRY_BASE_S * 2 ** max(0, attempts - 1)))


def _finish_study(session: Session, study_id: int) -> None:
    """EXPORTED once every delivery of the study's current report has finished."""
    from preread.worker.pipeline.stages import EXPORTABLE, set_state

    _lock_study(session, study_id)  # taken first by the caller already; a no-op then
    open_rows = session.execute(
        select(Delivery.id)
        .join(Report, Report.id == Delivery.report_id)
        .where(Delivery.study_id == study_id, Report.current.is_(True), Delivery.state.not_in([str(s) for s in FINISHED]))
        .limit(1)
    ).first()
    if open_rows is None:
        set_state(session, study_id, StudyState.EXPORTED, expect=EXPORTABLE)


def _lock_study(session: Session, study_id: int) -> None:
    """Lock the study row (Postgres) before any delivery row: one lock order for every recording transaction.

    Two destinations finishing at once then cannot both see the other open, and
    a destination's thread recording one row while another claims the next
    cannot deadlock on study and delivery rows taken in opposite orders.
    """
    session.execute(select(Study.id).where(Study.id == study_id).with_for_update())


def _record_success(settings: Settings, delivery_id: int, study_id: int, commitment_uid: str | None) -> None:
    now = utcnow()
    with session_scope(settings.effective_database_url) as session:
        _lock_study(session, study_id)
        # A commitment report may already have confirmed the row (it can beat this write): keep that.
        session.execute(
            update(Delivery).where(Delivery.id == delivery_id, Delivery.state == DeliveryState.SENDING).values(
                state=DeliveryState.UNCONFIRMED if commitment_uid else DeliveryState.DELIVERED,
                commitment_uid=commitment_uid, last_error=None, next_attempt_at=now,
            )
        )
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(
            attempts=Delivery.attempts + 1, sent_at=now, updated_at=now))
        _finish_study(session, study_id)


def _record_failure(settings: Settings, dest: Destination, delivery_id: int, study_id: int, error: str,
                    permanent: bool) -> None:
    """Count the failure; back off this row and every other due row of the destination, or give up."""
    now = utcnow()
    with session_scope(settings.effective_database_url) as session:
        _lock_study(session, study_id)
        row = session.get(Delivery, delivery_id)
        if row is None:
            return
        attempts = row.attempts + 1
        too_old = (now - row.created_at).total_seconds() >= settings.delivery_max_age
        if permanent or too_old:
            row.state = DeliveryState.FAILED
            why = error if permanent else f"gave up after {attempts} attempts over {settings.delivery_max_age:.0f}s: {error}"
            row.last_error = why[:2000]
            log.error("delivery %s of study %s to %r FAILED: %s", delivery_id, study_id, dest.name, why)
        else:
            wait = backoff_s(attempts, settings)
            row.state = DeliveryState.PENDING
            row.next_attempt_at = now + timedelta(seconds=wait)
            row.last_error = error[:2000]
            log.warning("delivery %s of study %s to %r: %s; next attempt in %.0fs", delivery_id, study_id, dest.name, error, wait)
            # the destination is down for every row, not just this one
            # (rows another transaction holds, e.g. the next one being claimed, are skipped, not waited for)
            others = (
                select(Delivery.id)
                .where(Delivery.destination == dest.name, Delivery.id != delivery_id,
                       Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at < row.next_attempt_at)
                .with_for_update(skip_locked=True)
            )
            session.execute(
                update(Delivery).where(Delivery.id.in_(others)).values(next_attempt_at=row.next_attempt_at)
            )
        row.attempts = attempts
        row.updated_at = now
        session.flush()
        _finish_study(session, study_id)


def _due_ids(settings: Settings, name: str, report_id: int | None) -> list[tuple[int, int, int]]:
    with session_scope(settings.effective_database_url) as session:
        stmt = select(Delivery.id, Delivery.report_id, Delivery.study_id).where(Delivery.destination == name, _due(utcnow()))
        if report_id is not None:
            stmt = stmt.where(Delivery.report_id == report_id)
        rows = session.execute(stmt.order_by(Delivery.next_attempt_at, Delivery.id).limit(BATCH)).all()
        return [(int(r[0]), int(r[1]), int(r[2])) for r in rows]


@dataclass
class _Job:
    """One claimed row, its context and (where the exporter prepares ahead) its built payload."""

    delivery_id: int
    study_id: int
    transaction_uid: str | None = None
    ctx: ExportContext | None = None
    payload: Any = None
    error: str | None = None


def _prepare(settings: Settings, dest: Destination, exporter: Any, row: tuple[int, int, int]) -> _Job | None:
    """Claim a row and build what it sends; None when another sender has it."""
    delivery_id, rid, study_id = row
    job = _Job(delivery_id, study_id, str(generate_uid()) if getattr(dest, "storage_commitment", False) else None)
    with session_scope(settings.effective_database_url) as session:
        if not _claim(session, delivery_id, lease_s(dest), job.transaction_uid):
            return None
    try:
        with session_scope(settings.effective_database_url) as session:
            job.ctx = load_context(session, settings, rid)
        if isinstance(exporter, PreparingExporter):
            job.payload = exporter.prepare(job.ctx, settings)
    except ExportInputError as exc:
        job.error = str(exc)
    except Exception as exc:  # a bug or a draft highdicom refuses: the row fails, the others go on
        log.exception("delivery %s of study %s to %r: cannot build it", delivery_id, study_id, dest.name)
        job.error = f"cannot build the result: {type(exc).__name__}"
    return job


def _release(settings: Settings, job: _Job | None) -> None:
    """Give back a row claimed ahead when the destination failed: due with the others, not counted."""
    if job is None:
        return
    with session_scope(settings.effective_database_url) as session:
        session.execute(update(Delivery).where(Delivery.id == job.delivery_id, Delivery.state == DeliveryState.SENDING)
                        .values(state=DeliveryState.PENDING, next_attempt_at=utcnow(), updated_at=utcnow()))


def work_destination(settings: Settings, dest: Destination, report_id: int | None = None) -> int:
    """Send what is due for one destination until nothing is due or it fails; returns rows delivered.

    The next row is claimed and built in a helper thread while the current one is on the wire,
    and a sent row is recorded there too, so building and committing overlap the peer storing.
    """
    exporter = exporter_for(dest)
    sent = 0
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"preread-prepare-{dest.name}")
    records: list[Future[None]] = []
    try:
        while True:
            rows = _due_ids(settings, dest.name, report_id)
            if not rows:
                return sent
            upcoming: Future[_Job | None] = ahead.submit(_prepare, settings, dest, exporter, rows[0])
            for i in range(len(rows)):
                job = upcoming.result()
                if i + 1 < len(rows):
                    upcoming = ahead.submit(_prepare, settings, dest, exporter, rows[i + 1])
                if job is None:
                    continue
                if job.error is not None or job.ctx is None:
                    _record_failure(settings, dest, job.delivery_id, job.study_id, job.error or "no context", permanent=True)
                    continue
                if job.transaction_uid is not None:
                    setattr(exporter, "transaction_uid", job.transaction_uid)  # only the dicom exporter asks for commitment
                try:
                    if job.payload is not None and isinstance(exporter, PreparingExporter):
                        result = exporter.send_prepared(job.payload, settings)
                    else:
                        result = exporter.send(job.ctx, settings)
                except PermanentDeliveryError as exc:
                    _record_failure(settings, dest, job.delivery_id, job.study_id, str(exc), permanent=True)
                    continue
                except Exception as exc:
                    if not isinstance(exc, (DeliveryError, OSError, TimeoutError)):  # a bug: say what broke, try later
                        log.exception("delivery %s of study %s to %r: unexpected error", job.delivery_id, job.study_id, dest.name)
                    error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}"
                    if i + 1 < len(rows):
                        _release(settings, upcoming.result())
                    _record_failure(settings, dest, job.delivery_id, job.study_id, error, permanent=False)
                    return sent
                # Recorded on the helper thread (after the next row's preparation), so the next send does
                # not wait for this commit; a crash before it leaves the row SENDING, re-sent after its lease.
                records.append(ahead.submit(_record_success, settings, job.delivery_id, job.study_id, result.commitment_uid))
                sent += 1
    finally:
        ahead.shutdown(wait=True)
        for record in records:
            if record.exception() is not None:  # the database hiccupped: the row is re-sent after its lease
                log.warning("destination %r: recording a delivery failed: %s", dest.name, type(record.exception()).__name__)
        close = getattr(exporter, "close", None)
        if callable(close):
            close()


class _Senders:
    """One worker thread per destination at a time, shared by every coordinator pass of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[str, Future[int]] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="preread-deliver")

    def submit(self, settings: Settings, dest: Destination) -> Future[int] | None:
        with self._lock:
            running = self._busy.get(dest.name)
            if running is not None and not running.done():
                return None
            future = self._pool.submit(work_destination, settings, dest)
            self._busy[dest.name] = future
            return future


_SENDERS = _Senders()


def _expire_unconfirmed(session: Session, settings: Settings) -> None:
    cutoff = utcnow() - timedelta(seconds=settings.delivery_max_age)
    session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.UNCONFIRMED, Delivery.sent_at < cutoff)
        .values(state=DeliveryState.FAILED, last_error="storage commitment not confirmed in time", updated_at=utcnow())
    )


def deliver_due(settings: Settings, *, wait: bool = False, only: str | None = None) -> int:
    """Coordinator hook: plan new rows and start sending what is due, one thread per destination.

    ``only`` names the one destination to send to (``preread export --destination``); rows of the
    others stay due for the coordinator. Returns the rows planned plus, with ``wait=True``, the rows
    delivered in this call.
    """
    destinations = destinations_from_settings(settings)
    if not destinations:
        return 0
    with session_scope(settings.effective_database_url) as session:
        planned = plan(session, destinations)
        _expire_unconfirmed(session, settings)
    with session_scope(settings.effective_database_url) as session:
        due_names = set(session.execute(select(Delivery.destination).where(_due(utcnow())).distinct()).scalars())
    if only is not None:
        due_names &= {only}
    futures = [f for d in destinations if d.name in due_names if (f := _SENDERS.submit(settings, d)) is not None]
    if not wait:
        return planned
    return planned + sum(f.result() for f in futures)


def deliver_report(settings: Settings, study_id: int, report_id: int) -> tuple[int, int]:
    """Plan and send one report to every destination now, in parallel; (delivered, still open)."""
    destinations = destinations_from_settings(settings)
    with session_scope(settings.effective_database_url) as session:
        plan(session, destinations, study_id=study_id)
    with ThreadPoolExecutor(max_workers=max(1, len(destinations))) as pool:
        delivered = sum(pool.map(lambda d: work_destination(settings, d, report_id), destinations))
    with session_scope(settings.effective_database_url) as session:
        _finish_study(session, study_id)
        still_open = len(session.execute(
            select(Delivery.id).where(Delivery.report_id == report_id, Delivery.state.not_in([str(s) for s in FINISHED]))
        ).all())
    return delivered, still_open


def confirm_commitment(settings: Settings, transaction_uid: str, committed: bool) -> int:
    """The listener's hook for an N-EVENT-REPORT: confirm (or fail) the deliveries of that transaction."""
    now = utcnow()
    with session_scope(settings.effective_database_url) as session:
        rows = session.execute(select(Delivery).where(
            Delivery.commitment_uid == transaction_uid,
            Delivery.state.in_([DeliveryState.UNCONFIRMED, DeliveryState.SENDING]),
        )).scalars().all()
        for row in rows:
            row.state = DeliveryState.DELIVERED if committed else DeliveryState.FAILED
            row.confirmed_at = now if committed else None
            row.last_error = None if committed else "the PACS reported the SR not committed"
            row.updated_at = now
            session.flush()
            _finish_study(session, row.study_id)
        return len(rows)


def resend(session: Session, *, study_uids: Sequence[str] = (), since: datetime | None = None,
           destination: str | None = None, study_ids: Sequence[int] | None = None) -> int:
    """Make the current reports' deliveries due again now (``preread export``); returns rows reset."""
    stmt = (
        update(Delivery)
        .where(Delivery.report_id.in_(select(Report.id).where(Report.current.is_(True))))
        .values(state=DeliveryState.PENDING, next_attempt_at=utcnow(), attempts=0, last_error=None,
                created_at=utcnow(), updated_at=utcnow())
    )
    if study_uids:
        stmt = stmt.where(Delivery.study_id.in_(select(Study.id).where(Study.study_instance_uid.in_(list(study_uids)))))
    if study_ids is not None:
        stmt = stmt.where(Delivery.study_id.in_(list(study_ids)))
    if since is not None:
        stmt = stmt.where(Delivery.created_at >= since)
    if destination is not None:
        stmt = stmt.where(Delivery.destination == destination)
    stmt = stmt.where(or_(Delivery.state != DeliveryState.SENDING, Delivery.next_attempt_at <= utcnow()))
    return int(cast(CursorResult[Any], session.execute(stmt)).rowcount)


def summary(session: Session, study_id: int | None = None) -> list[tuple[str, str, int]]:
    """(destination, state, count) over current reports, for ``preread status`` and the API's study view."""
    from sqlalchemy import func

    stmt = (
        select(Delivery.destination, Delivery.state, func.count())
        .join(Report, Report.id == Delivery.report_id)
        .where(Report.current.is_(True))
        .group_by(Delivery.destination, Delivery.state)
        .order_by(Delivery.destination, Delivery.state)
    )
    if study_id is not None:
        stmt = stmt.where(Delivery.study_id == study_id)
    return [(str(d), str(s), int(n)) for d, s, n in session.execute(stmt).all()]

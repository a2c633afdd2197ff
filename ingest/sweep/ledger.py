"""Sweep state in the database: sweeps, their studies, the hold on the stability monitor, the release.

Everything a sweep knows lives in ``sweeps`` and ``sweep_studies``, written in
short transactions, so a coordinator killed at any moment resumes where it
stopped. A study with a ``sweep_studies`` row in a holding state is never
flipped STABLE by the stability monitor (:func:`not_held_by_sweep`); the sweep
releases it (STABLE and an outbox row, in the transaction that records its
count) once it has checked what arrived, so a study is handed on once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Connection, and_, case, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from preread.schemas.tables import (
    Instance,
    Outbox,
    Report,
    Series,
    Study,
    StudyState,
    Sweep,
    SweepState,
    SweepStudy,
    SweepStudyState,
    utcnow,
)

if TYPE_CHECKING:
    from preread.ingest.sweep.query import RemoteStudy

#: Sweep-study states that hold the study back from the stability monitor.
HOLDING = (SweepStudyState.PENDING, SweepStudyState.COUNTED, SweepStudyState.RETRIEVING)
#: Sweep states a coordinator works on.
ACTIVE = (SweepState.QUEUED, SweepState.RUNNING)
#: Sweep states not yet ended (a paused sweep still holds its studies).
OPEN = (SweepState.QUEUED, SweepState.RUNNING, SweepState.PAUSED)
#: Study states after which a released study no longer counts as in flight.
FINISHED_STUDY = (StudyState.DRAFTED, StudyState.EXPORTED, StudyState.FAILED)
#: Outbox and study priority of sweep studies: below routine (rank 0), so live studies go first.
SWEEP_PRIORITY = -1
#: Outbox topic of the first pipeline stage (as ``ingest.assembly.stability``).
RENDER_TOPIC = "render"


def not_held_by_sweep() -> ColumnElement[bool]:
    """SQL condition on ``Study``: no open sweep holds it (used by ``stability.mark_stable``)."""
    return ~exists().where(
        SweepStudy.study_instance_uid == Study.study_instance_uid,
        SweepStudy.state.in_([str(s) for s in HOLDING]),
    )


def _rowcount(result: Any) -> int:
    """Rows an INSERT/UPDATE touched (a CursorResult's rowcount)."""
    return int(getattr(result, "rowcount", 0) or 0)


def _insert(session: Session):  # type: ignore[no-untyped-def]
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def create_sweep(
    session: Session, source: str, date_from: date, date_to: date, modalities: Iterable[str] = (), *,
    force: bool = False, ignore_window: bool = False, schedule_key: str | None = None,
) -> int | None:
    """Insert a queued sweep; returns its id (None when ``schedule_key`` exists already)."""
    values = dict(
        source=source, date_from=date_from, date_to=date_to, modalities=",".join(modalities), force=force,
        ignore_window=ignore_window, state=str(SweepState.QUEUED), next_day=date_from, schedule_key=schedule_key,
        counts={}, created_at=utcnow(), updated_at=utcnow(),
    )
    stmt = _insert(session)(Sweep).values(**values)
    if schedule_key is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=["schedule_key"])
    row = session.execute(stmt.returning(Sweep.id)).first()
    return int(row[0]) if row else None


def claim(session: Session, owner: str, lease_s: float, now: datetime | None = None) -> list[int]:
    """Take (or renew) the lease on every active sweep nobody else holds; returns the ids now ours."""
    now = now or utcnow()
    free = or_(Sweep.owner.is_(None), Sweep.owner == owner, Sweep.lease_until.is_(None), Sweep.lease_until < now)
    session.execute(
        update(Sweep)
        .where(Sweep.state.in_([str(s) for s in ACTIVE]), free)
        .values(owner=owner, lease_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(select(Sweep.id).where(Sweep.owner == owner, Sweep.state.in_([str(s) for s in ACTIVE]))))


def still_ours(session: Session, sweep_id: int, owner: str) -> Sweep | None:
    """The sweep, if it is active and this owner still holds its lease."""
    sweep = session.get(Sweep, sweep_id)
    if sweep is None or sweep.owner != owner or sweep.state not in [str(s) for s in ACTIVE]:
        return None
    return sweep


def current_report_uids(session: Session, uids: list[str], model_id: str, prompt_version: str) -> set[str]:
    """Those of ``uids`` whose study has a current report from this model and prompt version."""
    if not uids:
        return set()
    rows = session.scalars(
        select(Study.study_instance_uid)
        .join(Report, Report.study_id == Study.id)
        .where(Study.study_instance_uid.in_(uids), Report.current.is_(True), Report.model_id == model_id,
               Report.prompt_version == prompt_version)
    )
    return set(rows)


def add_found(session: Session, sweep: Sweep, studies: list[RemoteStudy], skip: set[str]) -> int:
    """Record a day's studies (once each); those in ``skip`` are SKIPPED. Returns rows added.

    A study the source gave a count for (Number of Study Related Instances) is
    recorded COUNTED with that count as ``expected``; the others PENDING, to be
    counted at IMAGE level before their retrieve.
    """
    if not studies:
        return 0

    def state(s: RemoteStudy) -> SweepStudyState:
        if s.study_uid in skip:
            return SweepStudyState.SKIPPED
        return SweepStudyState.PENDING if s.instances is None else SweepStudyState.COUNTED

    rows = [
        dict(
            sweep_id=sweep.id, study_instance_uid=s.study_uid, study_date=s.study_date, modalities=s.modalities[:64],
            state=str(state(s)), expected=s.instances,
            error="current report from this model and prompt version" if s.study_uid in skip else None,
            attempts=0, updated_at=utcnow(),
        )
        for s in studies
    ]
    stmt = _insert(session)(SweepStudy).values(rows).on_conflict_do_nothing(
        index_elements=["sweep_id", "study_instance_uid"]
    )
    return _rowcount(session.execute(stmt))


def in_flight(session: Session, source: str) -> int:
    """Sweep studies of ``source`` retrieving, or handed to the pipeline and not yet drafted."""
    retrieving = session.execute(
        select(func.count()).select_from(SweepStudy).join(Sweep, Sweep.id == SweepStudy.sweep_id)
        .where(Sweep.source == source, SweepStudy.state == str(SweepStudyState.RETRIEVING))
    ).scalar_one()
    waiting = session.execute(
        select(func.count()).select_from(SweepStudy).join(Sweep, Sweep.id == SweepStudy.sweep_id)
        .join(Study, Study.id == SweepStudy.study_id)
        .where(Sweep.source == source,
               SweepStudy.state.in_([str(SweepStudyState.RELEASED), str(SweepStudyState.INCOMPLETE)]),
               Study.state.not_in([str(s) for s in FINISHED_STUDY]))
    ).scalar_one()
    return int(retrieving) + int(waiting)


def next_studies(session: Session, sweep_id: int, limit: int) -> list[SweepStudy]:
    """Up to ``limit`` studies still to retrieve, oldest first (an interrupted retrieve is taken again)."""
    if limit <= 0:
        return []
    return list(session.scalars(
        select(SweepStudy)
        .where(SweepStudy.sweep_id == sweep_id, SweepStudy.state.in_([str(s) for s in HOLDING]))
        .order_by(SweepStudy.study_date, SweepStudy.id)
        .limit(limit)
    ))


def received_count(session: Session | Connection, study_uid: str) -> tuple[int | None, int]:
    """(study id or None, instances stored here) for a Study Instance UID, in one statement."""
    row = session.execute(
        select(Study.id, func.count(Instance.id))
        .select_from(Study)
        .outerjoin(Series, Series.study_id == Study.id)
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Study.study_instance_uid == study_uid)
        .group_by(Study.id)
    ).first()
    if row is None:
        return None, 0
    return int(row[0]), int(row[1])


def set_study(session: Session | Connection, row_id: int, **values: Any) -> None:
    """Update one sweep-study row."""
    session.execute(update(SweepStudy).where(SweepStudy.id == row_id).values(updated_at=utcnow(), **values))


def release(session: Session | Connection, row_id: int, study_id: int, state: SweepStudyState, received: int,
            error: str | None) -> bool:
    """Hand a checked study to the pipeline: STABLE, lowest priority, one outbox row; False if already released.

    The sweep-study row leaves its holding state in the same transaction, and
    only from a holding state, so a study is released (and drafted) once.
    A study that is already STABLE or RENDERED is in the pipeline already and
    gets no second outbox row.
    """
    now = utcnow()
    moved = _rowcount(session.execute(
        update(SweepStudy)
        .where(SweepStudy.id == row_id, SweepStudy.state.in_([str(s) for s in HOLDING]))
        .values(state=str(state), received=received, study_id=study_id, error=error, updated_at=now)
    ))
    if not moved:
        return False
    flipped = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.state.not_in([str(StudyState.STABLE), str(StudyState.RENDERED)]))
        .values(state=str(StudyState.STABLE), state_changed_at=now, updated_at=now, error=None, attempts=0,
                source="sweep", priority=case((Study.priority <= 0, SWEEP_PRIORITY), else_=Study.priority))
        .returning(Study.study_instance_uid)
        .execution_options(synchronize_session=False)
    ).first()
    if flipped is not None:
        session.execute(insert(Outbox).values(
            study_id=study_id, topic=RENDER_TOPIC, priority=SWEEP_PRIORITY, created_at=now, attempts=0,
            payload={"study_instance_uid": flipped[0], "reason": "sweep"},
        ))
    return True


@dataclass
class SweepCounts:
    """Studies of a sweep by where they stand."""

    found: int = 0
    skipped: int = 0
    waiting: int = 0
    in_pipeline: int = 0
    drafted: int = 0
    incomplete: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        """Studies the sweep is done with."""
        return self.skipped + self.drafted + self.failed

    def as_dict(self) -> dict[str, int]:
        return dict(found=self.found, skipped=self.skipped, waiting=self.waiting, in_pipeline=self.in_pipeline,
                    drafted=self.drafted, incomplete=self.incomplete, failed=self.failed)


def counts(session: Session, sweep_id: int) -> SweepCounts:
    """Count a sweep's studies (drafted = released and now DRAFTED or EXPORTED)."""
    result = SweepCounts()
    rows = session.execute(
        select(SweepStudy.state, Study.state, func.count())
        .outerjoin(Study, Study.id == SweepStudy.study_id)
        .where(SweepStudy.sweep_id == sweep_id)
        .group_by(SweepStudy.state, Study.state)
    ).all()
    for state, study_state, n in rows:
        result.found += n
        if state == SweepStudyState.SKIPPED:
            result.skipped += n
        elif state in (SweepStudyState.FAILED, SweepStudyState.CANCELLED):
            result.failed += n
        elif state in HOLDING:
            result.waiting += n
        else:
            if state == SweepStudyState.INCOMPLETE:
                result.incomplete += n
            if study_state in (StudyState.DRAFTED, StudyState.EXPORTED):
                result.drafted += n
            elif study_state == StudyState.FAILED or study_state is None:
                result.failed += n
            else:
                result.in_pipeline += n
    return result


def set_sweep(session: Session, sweep_id: int, **values: Any) -> None:
    """Update one sweep row."""
    session.execute(update(Sweep).where(Sweep.id == sweep_id).values(updated_at=utcnow(), **values))


def change_state(session: Session, sweep_id: int, to: SweepState, allowed_from: Iterable[SweepState]) -> bool:
    """Move a sweep between states (pause, resume, cancel); a cancelled sweep lets go of its studies."""
    values: dict[str, Any] = {"state": str(to), "updated_at": utcnow()}
    if to in (SweepState.QUEUED,):
        values.update(error=None, owner=None, lease_until=None)
    if to in (SweepState.CANCELLED, SweepState.DONE, SweepState.FAILED):
        values["finished_at"] = utcnow()
    moved = _rowcount(session.execute(
        update(Sweep).where(Sweep.id == sweep_id, Sweep.state.in_([str(s) for s in allowed_from])).values(**values)
    ))
    if moved and to == SweepState.CANCELLED:
        session.execute(
            update(SweepStudy)
            .where(SweepStudy.sweep_id == sweep_id, SweepStudy.state.in_([str(s) for s in HOLDING]))
            .values(state=str(SweepStudyState.CANCELLED), updated_at=utcnow())
        )
    return bool(moved)


def open_sweeps_summary(session: Session) -> list[Sweep]:
    """Sweeps not ended, and those ended in the last day, newest first."""
    recent = utcnow() - timedelta(days=1)
    return list(session.scalars(
        select(Sweep).where(or_(Sweep.state.in_([str(s) for s in OPEN]), and_(Sweep.finished_at.is_not(None), Sweep.finished_at > recent)))
        .order_by(Sweep.id.desc()).limit(20)
    ))


def source_names(session: Session, sweep_ids: list[int]) -> dict[int, str]:
    """The source name of each sweep id."""
    if not sweep_ids:
        return {}
    return {int(i): str(s) for i, s in session.execute(select(Sweep.id, Sweep.source).where(Sweep.id.in_(sweep_ids)))}

"""The stability rule for a released association's hint, on Postgres and SQLite."""

from __future__ import annotations

from datetime import timedelta

from pydicom.uid import generate_uid

from preread.ingest.assembly.stability import mark_stable
from preread.schemas.database import session_scope
from preread.schemas.tables import Study, StudyState, utcnow


def _study(url: str, *, released_ago: float | None, hint_ago: float | None, received_ago: float) -> int:
    now = utcnow()
    with session_scope(url) as session:
        study = Study(
            study_instance_uid=generate_uid(), state=StudyState.RECEIVING, modalities="CR",
            last_received_at=now - timedelta(seconds=received_ago),
            released_at=None if released_ago is None else now - timedelta(seconds=released_ago),
            release_hint_at=None if hint_ago is None else now - timedelta(seconds=hint_ago),
        )
        session.add(study)
        session.flush()
        return study.id


def test_hint_flips_only_a_study_quiet_since_its_release(db_url: str) -> None:
    hinted = _study(db_url, released_ago=2, hint_ago=1, received_ago=2.5)  # grace passed, nothing since the release
    waiting = _study(db_url, released_ago=2, hint_ago=-5, received_ago=2.5)  # grace not over yet
    newer = _study(db_url, released_ago=2, hint_ago=1, received_ago=0.5)  # an instance came after the release
    none = _study(db_url, released_ago=None, hint_ago=None, received_ago=5)  # no release yet, not idle for long
    with session_scope(db_url) as session:
        flipped = mark_stable(session, stable_after=600)
    assert flipped == [hinted]
    with session_scope(db_url) as session:
        assert {s.id: s.state for s in session.query(Study)} == {
            hinted: "STABLE", waiting: "RECEIVING", newer: "RECEIVING", none: "RECEIVING"}


def test_hint_leaves_a_study_an_open_sweep_owns(db_url: str) -> None:
    """A study a sweep still retrieves waits for the sweep's release, hint or not."""
    from datetime import date

    from sqlalchemy import update

    from preread.schemas.tables import Sweep, SweepState, SweepStudy, SweepStudyState

    hinted = _study(db_url, released_ago=2, hint_ago=1, received_ago=2.5)
    with session_scope(db_url) as session:
        uid = session.get(Study, hinted).study_instance_uid  # type: ignore[union-attr]
        sweep = Sweep(source="pacs", date_from=date(2026, 11, 1), date_to=date(2026, 11, 2), state=SweepState.RUNNING)
        session.add(sweep)
        session.flush()
        session.add(SweepStudy(sweep_id=sweep.id, study_instance_uid=uid, state=SweepStudyState.RETRIEVING))
    with session_scope(db_url) as session:
        assert mark_stable(session, stable_after=600) == []
    with session_scope(db_url) as session:
        session.execute(update(SweepStudy).where(SweepStudy.study_instance_uid == uid).values(state=SweepStudyState.RELEASED))
    with session_scope(db_url) as session:
        assert mark_stable(session, stable_after=600) == [hinted]


def test_monitor_looks_when_a_release_grace_ends_not_at_its_next_tick(db_url: str) -> None:
    """The listener tells its monitor when a grace ends: a monitor whose next tick is an hour away flips the study then."""
    from preread.ingest.assembly.stability import StabilityMonitor
    from tests.support.procs import wait_until

    monitor = StabilityMonitor(db_url, stable_after=600, interval=3600.0)
    monitor.start()  # one pass now, the next in an hour
    try:
        study_id = _study(db_url, released_ago=0, hint_ago=-0.5, received_ago=0.1)  # its grace ends in half a second
        monitor.due_in(0.5)  # what the listener's release handler does

        def state() -> str | None:
            with session_scope(db_url) as session:
                study = session.get(Study, study_id)
                return str(study.state) if study is not None and study.state == StudyState.STABLE else None

        wait_until(state, 30, interval=0.05, what="the released study to become STABLE")
    finally:
        monitor.stop()

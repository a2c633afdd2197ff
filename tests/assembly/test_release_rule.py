"""The stability rule for a released association's hint, on Postgres and SQLite."""

from __future__ import annotations

from datetime import timedelta

from pydicom.uid import generate_uid
from sqlalchemy import text

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
    """Where the sweep tables exist (another stage's migration), an open sweep's study waits for the idle timer."""
    hinted = _study(db_url, released_ago=2, hint_ago=1, received_ago=2.5)
    with session_scope(db_url) as session:
        uid = session.get(Study, hinted).study_instance_uid  # type: ignore[union-attr]
        session.execute(text("create table sweeps (id integer primary key, state varchar(16) not null)"))
        session.execute(text("create table sweep_studies (id integer primary key, sweep_id integer not null, "
                             "study_instance_uid varchar(64) not null)"))
        session.execute(text("insert into sweeps (id, state) values (1, 'running'), (2, 'done')"))
        session.execute(text("insert into sweep_studies (id, sweep_id, study_instance_uid) values (1, 1, :u)"), dict(u=uid))
    with session_scope(db_url) as session:
        assert mark_stable(session, stable_after=600) == []
    with session_scope(db_url) as session:
        session.execute(text("update sweeps set state = 'done' where id = 1"))
    with session_scope(db_url) as session:
        assert mark_stable(session, stable_after=600) == [hinted]

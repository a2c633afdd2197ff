"""Duplicate deliveries: a redelivered task or a reconciler pass never counts as a retry.

The broker delivers at least once, and the reconciler re-enqueues a study it
thinks lost. Neither may make a study that failed once look retried, nor
re-enqueue a hand-off a worker has not had time to take.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select, update

from preread.ingest.assembly.catalog import record_instance
from preread.schemas.database import session_scope
from preread.schemas.settings import Settings, get_settings
from preread.schemas.tables import Outbox, Study, StudyState, utcnow
from tests.conftest import testdata
from preread.worker.pipeline.reconciler import reconcile_once


def _stable_study(url: str, name: str) -> int:
    """A STABLE study of one real file, as the stability monitor leaves it (outbox row published)."""
    path = testdata(name)
    with session_scope(url) as session:
        study_id, _ = record_instance(session, dcmread(path), path, path.stat().st_size)
        session.execute(update(Study).where(Study.id == study_id).values(state=StudyState.STABLE, state_changed_at=utcnow()))
        session.add(Outbox(study_id=study_id, topic="render", payload={"study_id": study_id}, sent_at=utcnow()))
    return study_id


@pytest.fixture
def settings(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The worker's Celery app, in this process, on this test's database and an in-memory broker."""
    monkeypatch.setenv("PREREAD_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    from preread.worker.pipeline.celery_app import app

    previous = app.conf.preread_settings, app.conf.broker_url, app.conf.broker_transport_options
    app.conf.preread_settings = Settings(database_url=db_url, data_dir=tmp_path, reconcile_after=30)
    app.conf.broker_url, app.conf.broker_transport_options = "memory://", {}
    yield app.conf.preread_settings
    app.conf.preread_settings, app.conf.broker_url, app.conf.broker_transport_options = previous
    get_settings.cache_clear()


def _render(study_id: int) -> str:
    """One delivery of the render task, run the way a worker runs it."""
    from preread.worker.pipeline.tasks import render_study

    return render_study.apply(args=[study_id]).get()


def _study(url: str, study_id: int) -> Study:
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        session.expunge(study)
        return study


def test_redelivered_render_of_a_failed_study_is_not_an_attempt(settings: Settings) -> None:
    url = settings.effective_database_url
    study_id = _stable_study(url, "test-SR.dcm")
    assert _render(study_id) == "failed"
    assert _render(study_id) == "superseded", "the duplicate finds the study FAILED"
    study = _study(url, study_id)
    assert study.state == StudyState.FAILED and "nothing renderable" in (study.error or "")
    assert study.attempts == 1, "bad input is tried once, however often it is delivered"


def test_redelivered_render_of_a_rendered_study_leaves_it_alone(settings: Settings) -> None:
    url = settings.effective_database_url
    study_id = _stable_study(url, "CT_small.dcm")
    assert _render(study_id) == "RENDERED"
    assert _render(study_id) == "superseded"
    study = _study(url, study_id)
    assert study.state == StudyState.RENDERED and study.attempts == 0, "a new stage starts its count at 0"
    with session_scope(url) as session:
        handoffs = session.execute(select(func.count()).select_from(Outbox).where(Outbox.study_id == study_id, Outbox.topic == "infer")).scalar_one()
    assert handoffs == 1, "one hand-off to infer, not one per delivery"


def test_reconciler_waits_for_a_recent_handoff_then_re_enqueues(settings: Settings) -> None:
    url = settings.effective_database_url
    study_id = _stable_study(url, "CT_small.dcm")
    long_ago = utcnow() - timedelta(seconds=3 * settings.reconcile_after)
    with session_scope(url) as session:
        session.execute(update(Study).where(Study.id == study_id).values(state_changed_at=long_ago))
    assert reconcile_once(settings) == 0, "the hand-off went out just now: a worker may not have taken it yet"

    with session_scope(url) as session:
        session.execute(update(Outbox).where(Outbox.study_id == study_id).values(sent_at=long_ago))
    assert reconcile_once(settings) == 1, "published long ago and the study still waits: re-enqueue it"
    with session_scope(url) as session:
        unsent = session.execute(select(Outbox.topic).where(Outbox.study_id == study_id, Outbox.sent_at.is_(None))).scalars().all()
    assert unsent == ["render"]
    assert reconcile_once(settings) == 0, "one re-enqueue per study while it is pending"


def test_reconciler_leaves_a_lost_export_to_the_deliveries_which_send_it(settings: Settings) -> None:
    """A DRAFTED study whose export task was lost gets no second task: the coordinator's planner makes its row."""
    from preread.schemas.tables import Delivery, DeliveryState, Report
    from preread.worker.exporters.deliveries import deliver_due

    url = settings.effective_database_url
    exporting = settings.model_copy(update={"export_fhir": True})
    long_ago = utcnow() - timedelta(seconds=3 * settings.reconcile_after)
    with session_scope(url) as session:
        study = Study(study_instance_uid="1.2.826.0.1.55", patient_id="MRN-55", state=StudyState.DRAFTED,
                      state_changed_at=long_ago)
        session.add(study)
        session.flush()
        session.add(Report(study_id=study.id, current=True, draft_text="x", impression="Fine.", raw_output="{}",
                           parse_status="ok", model_id="m", prompt_version="v1"))
        session.add(Outbox(study_id=study.id, topic="export", payload={"study_id": study.id}, sent_at=long_ago))
        study_id = study.id
    assert reconcile_once(exporting) == 0, "no export task is re-enqueued for a DRAFTED study"
    with session_scope(url) as session:
        assert session.execute(select(func.count()).select_from(Outbox).where(Outbox.sent_at.is_(None))).scalar_one() == 0
    assert deliver_due(exporting, wait=True) == 2, "the coordinator's pass plans its row and delivers it"
    assert (exporting.exports_dir / "1.2.826.0.1.55.json").exists()
    with session_scope(url) as session:
        assert [(d.destination, d.state) for d in session.scalars(select(Delivery))] == [("fhir-file", DeliveryState.DELIVERED)]
    assert _study(url, study_id).state == StudyState.EXPORTED
    assert reconcile_once(exporting) == 0

"""Attempts per stage, declared retries, and the recovery commands ``preread retry`` and ``preread export``.

Tasks run in this process the way a worker runs them (``apply``: Celery's
declared retries run at once), on a real Postgres and a real HTTP receiver.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from preread.cli.main import app as cli
from preread.ingest.assembly.catalog import record_instance
from preread.schemas.database import session_scope
from preread.schemas.settings import Settings, get_settings
from preread.schemas.tables import Delivery, DeliveryState, Outbox, Report, Study, StudyState, utcnow
from preread.worker.exporters.deliveries import deliver_due
from preread.worker.pipeline.reconciler import reconcile_once
from preread.worker.pipeline.status import snapshot
from tests.conftest import testdata
from tests.support.procs import free_port


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that records what it got."""

    bodies: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        Receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def worker_app(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The worker's Celery app in this process, on this test's database and an in-memory broker."""
    hook_port = free_port()
    env = dict(DATA_DIR=str(tmp_path), DATABASE_URL=pg_url, BROKER_URL="memory://", MAX_ATTEMPTS="3",
               WEBHOOK_URL=f"http://127.0.0.1:{hook_port}/hook", RECONCILE_AFTER="30")
    for key, value in env.items():
        monkeypatch.setenv(f"PREREAD_{key}", value)
    get_settings.cache_clear()
    from preread.worker.pipeline.celery_app import app  # built from this environment when first imported

    previous = app.conf.preread_settings, app.conf.broker_url, app.conf.broker_transport_options
    app.conf.preread_settings = Settings()
    app.conf.broker_url, app.conf.broker_transport_options = "memory://", {}
    app.conf.hook_port = hook_port
    Receiver.bodies = []
    yield app
    app.conf.preread_settings, app.conf.broker_url, app.conf.broker_transport_options = previous
    get_settings.cache_clear()


def _stable_study(url: str, name: str) -> tuple[int, str]:
    path = testdata(name)
    with session_scope(url) as session:
        study_id, _ = record_instance(session, dcmread(path), path, path.stat().st_size)
        session.execute(update(Study).where(Study.id == study_id).values(state=StudyState.STABLE))
        uid = session.get(Study, study_id).study_instance_uid
    return study_id, uid


def _drafted_study(url: str, uid: str = "1.2.826.0.1.99") -> int:
    with session_scope(url) as session:
        study = Study(study_instance_uid=uid, accession_number="ACC9", state=StudyState.DRAFTED, urgency="routine")
        session.add(study)
        session.flush()
        session.add(Report(study_id=study.id, current=True, draft_text="Impression: Normal.", impression="Normal.",
                           raw_output="{}", parse_status="ok", model_id="m", prompt_version="v1"))
        session.add(Outbox(study_id=study.id, topic="export", payload={}, sent_at=utcnow()))
        return study.id


def _study(url: str, study_id: int) -> Study:
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        session.expunge(study)
        return study


def _outbox(url: str, study_id: int, topic: str) -> int:
    with session_scope(url) as session:
        return int(session.execute(select(func.count()).select_from(Outbox).where(Outbox.study_id == study_id, Outbox.topic == topic)).scalar_one())


def test_transient_render_errors_retry_then_fail_with_stage_and_reason(worker_app, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from preread.worker.pipeline import tasks

    calls = []

    def flaky(settings: Settings, study_id: int, handoff: str | None = None) -> None:
        calls.append(study_id)
        raise ConnectionError("disk away")

    monkeypatch.setattr(tasks, "render_step", flaky)
    study_id, _ = _stable_study(pg_url, "CT_small.dcm")
    assert tasks.render_study.apply(args=[study_id]).get() == "failed"
    study = _study(pg_url, study_id)
    assert len(calls) == 3, "Celery retried until PREREAD_MAX_ATTEMPTS=3 attempts were used"
    assert study.state == StudyState.FAILED and study.attempts == 3
    assert study.error.startswith("render: transient error persisted after 3 attempts: ConnectionError")


def test_retry_puts_a_failed_render_back_once(worker_app, pg_url: str) -> None:
    from preread.worker.pipeline.tasks import render_study

    study_id, uid = _stable_study(pg_url, "test-SR.dcm")
    assert render_study.apply(args=[study_id]).get() == "failed"
    assert _study(pg_url, study_id).error.startswith("render: nothing renderable")
    runner = CliRunner()
    first = runner.invoke(cli, ["retry"])
    assert first.exit_code == 0, first.output
    assert f"{uid}: FAILED -> render: queued" in first.output
    study = _study(pg_url, study_id)
    assert (study.state, study.attempts, study.error) == (StudyState.STABLE, 0, None)
    again = runner.invoke(cli, ["retry"])
    assert "nothing to retry (no study in FAILED)" in again.output
    by_uid = runner.invoke(cli, ["retry", uid])
    assert f"{uid}: STABLE -> render: already queued" in by_uid.output
    assert _outbox(pg_url, study_id, "render") == 1, "one hand-off however often retry runs"
    unknown = runner.invoke(cli, ["retry", "--stage", "paint"])
    assert unknown.exit_code == 2 and "unknown --stage 'paint'" in unknown.output


def test_retry_sends_a_study_failed_in_infer_back_to_infer(worker_app, pg_url: str) -> None:
    from preread.worker.pipeline.tasks import render_study

    study_id, uid = _stable_study(pg_url, "CT_small.dcm")
    assert render_study.apply(args=[study_id]).get() == "RENDERED"
    with session_scope(pg_url) as session:
        session.execute(update(Study).where(Study.id == study_id).values(state=StudyState.FAILED, error="infer: boom", attempts=3))
    result = CliRunner().invoke(cli, ["retry", "--state", "FAILED"])
    assert f"{uid}: FAILED -> infer: queued" in result.output, result.output
    assert _study(pg_url, study_id).state == StudyState.RENDERED
    assert _outbox(pg_url, study_id, "infer") == 2, "the render hand-off and the retry's"


def _deliveries(url: str, study_id: int) -> list[Delivery]:
    with session_scope(url) as session:
        rows = list(session.scalars(select(Delivery).where(Delivery.study_id == study_id).order_by(Delivery.id)))
        session.expunge_all()
        return rows


def test_webhook_down_then_up_gets_the_draft_and_the_study_never_fails(worker_app, pg_url: str) -> None:
    from preread.worker.pipeline.tasks import export_study

    settings: Settings = worker_app.conf.preread_settings
    study_id = _drafted_study(pg_url)
    assert export_study.apply(args=[study_id]).get() == "DRAFTED", "the webhook's port is closed: the delivery waits"
    for _ in range(3):  # the coordinator's passes while the webhook stays down
        with session_scope(pg_url) as session:
            session.execute(update(Delivery).where(Delivery.study_id == study_id).values(next_attempt_at=utcnow()))
        deliver_due(settings, wait=True)
    [row] = _deliveries(pg_url, study_id)
    assert (row.destination, row.state, row.attempts) == ("webhook", DeliveryState.PENDING, 4)
    assert "webhook 'webhook' unreachable" in (row.last_error or "")
    study = _study(pg_url, study_id)
    assert study.state == StudyState.DRAFTED and study.error is None, "an export problem never turns a finished draft FAILED"
    [trouble] = snapshot(settings).export_failures
    assert (trouble.destination, trouble.pending, trouble.failed) == ("webhook", 1, 0), "status shows the failure"
    assert "unreachable" in trouble.last_error
    shown = CliRunner().invoke(cli, ["status"], terminal_width=200)
    assert "Delivery problems" in shown.output and "webhook 'webhook' unreachable" in shown.output, shown.output

    long_ago = utcnow() - timedelta(seconds=3 * settings.reconcile_after)
    with session_scope(pg_url) as session:
        session.execute(update(Study).where(Study.id == study_id).values(state_changed_at=long_ago))
        session.execute(update(Outbox).where(Outbox.study_id == study_id).values(sent_at=long_ago))
    assert reconcile_once(settings) == 0, "a DRAFTED study with a pending delivery is the coordinator's, not re-enqueued"
    assert _outbox(pg_url, study_id, "export") == 1
    assert _study(pg_url, study_id).state == StudyState.DRAFTED

    server = HTTPServer(("127.0.0.1", worker_app.conf.hook_port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with session_scope(pg_url) as session:  # its backoff has run out
            session.execute(update(Delivery).where(Delivery.study_id == study_id).values(next_attempt_at=utcnow()))
        assert deliver_due(settings, wait=True) == 1, "the coordinator's pass sends it once the webhook is up"
        assert [b["study_instance_uid"] for b in Receiver.bodies] == ["1.2.826.0.1.99"]
        study = _study(pg_url, study_id)
        assert study.state == StudyState.EXPORTED and study.error is None
        [row] = _deliveries(pg_url, study_id)
        assert (row.state, row.attempts, row.last_error) == (DeliveryState.DELIVERED, 5, None)
        assert snapshot(settings).export_failures == [], "a destination that recovered is no longer shown"
        again = CliRunner().invoke(cli, ["export", "1.2.826.0.1.99"], terminal_width=200)
        assert again.exit_code == 0 and "delivered" in again.output, again.output
        assert len(Receiver.bodies) == 2 and Receiver.bodies[0] == Receiver.bodies[1], "sending again sends the same draft"
        assert len(_deliveries(pg_url, study_id)) == 1, "sending again reuses the delivery row"
    finally:
        server.shutdown()
        server.server_close()


def test_export_sends_drafts_made_before_an_exporter_was_on(worker_app, pg_url: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings: Settings = worker_app.conf.preread_settings
    with session_scope(pg_url) as session:
        old = Study(study_instance_uid="1.2.826.0.1.7", patient_id="MRN-7", state=StudyState.DRAFTED, state_changed_at=utcnow() - timedelta(days=2))
        session.add(old)
        session.flush()
        session.add(Report(study_id=old.id, current=True, draft_text="x", impression="Old.", raw_output="{}",
                           parse_status="ok", model_id="m", prompt_version="v1"))
        old_id = old.id
    assert reconcile_once(settings) == 0, "the reconciler leaves DRAFTED to the deliveries"
    assert _outbox(pg_url, old_id, "export") == 0 and _deliveries(pg_url, old_id) == []
    monkeypatch.setenv("PREREAD_EXPORT_FHIR", "1")  # the FHIR file exporter is switched on after the draft
    get_settings.cache_clear()
    runner = CliRunner()
    sent = runner.invoke(cli, ["export", "--destination", "fhir-file"], terminal_width=200)
    assert sent.exit_code == 0, sent.output
    assert "1.2.826.0.1.7" in sent.output and "fhir-file" in sent.output and "delivered" in sent.output, sent.output
    bundle = json.loads((tmp_path / "exports" / "1.2.826.0.1.7.json").read_text())
    assert bundle["resourceType"] == "Bundle" and "Old." in json.dumps(bundle)
    assert [(d.destination, d.state) for d in _deliveries(pg_url, old_id)] == [
        ("fhir-file", DeliveryState.DELIVERED), ("webhook", DeliveryState.PENDING)], "planned for every destination"
    assert _study(pg_url, old_id).state == StudyState.DRAFTED, "the webhook (down) has not had it yet"

    (tmp_path / "exports" / "1.2.826.0.1.7.json").unlink()
    again = runner.invoke(cli, ["export", "--since", "2000-01-01", "--destination", "fhir-file"], terminal_width=200)
    assert again.exit_code == 0 and "(0 new, 1 sent again)" in again.output, again.output
    resent = json.loads((tmp_path / "exports" / "1.2.826.0.1.7.json").read_text())
    assert [e["fullUrl"] for e in resent["entry"]] == [e["fullUrl"] for e in bundle["entry"]], "the same draft again"
    assert [(d.destination, d.state) for d in _deliveries(pg_url, old_id)] == [
        ("fhir-file", DeliveryState.DELIVERED), ("webhook", DeliveryState.PENDING)], "idempotent: one row per destination"

    bad = runner.invoke(cli, ["export", "--destination", "ftp"])
    assert bad.exit_code == 2 and "no destination named 'ftp'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output

"""The implicit destinations of the shorthand settings: a FHIR Bundle file and a signed webhook per drafted study."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState, Report, Study, StudyState
from preread.worker.exporters.step import export_step
from preread.worker.exporters.webhook import SIGNATURE_HEADER
from preread.worker.pipeline.stages import BadInput, Superseded


def _drafted_study(url: str) -> int:
    with session_scope(url) as session:
        study = Study(study_instance_uid="1.2.3.4", accession_number="ACC1", patient_id="SECRET-ID",
                      state=StudyState.DRAFTED, urgency="priority", study_description="CT HEAD")
        session.add(study)
        session.flush()
        session.add(Report(study_id=study.id, current=True, draft_text="Findings:\n- No bleed.\n\nImpression: Normal.",
                           impression="Normal.", raw_output="{}", parse_status="ok", model_id="m", prompt_version="v1"))
        return study.id


class _Sink(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Sink.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_export_writes_fhir_and_posts_signed_webhook(pg_url: str, tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Sink.received = []
    try:
        settings = Settings(database_url=pg_url, data_dir=tmp_path, export_fhir=True,
                            webhook_url=f"http://127.0.0.1:{server.server_port}/hook", webhook_secret="s3cret")
        study_id = _drafted_study(pg_url)
        export_step(settings, study_id)
    finally:
        server.shutdown()
    bundle = json.loads((tmp_path / "exports" / "1.2.3.4.json").read_text())
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    [resource] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert resource["status"] == "preliminary"
    assert resource["conclusion"] == "Normal."
    headers, body = _Sink.received[0]
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    payload = json.loads(body)
    assert payload["study_instance_uid"] == "1.2.3.4" and payload["accession_number"] == "ACC1"
    assert "SECRET-ID" not in body.decode(), "the webhook carries no patient ID"
    assert resource["subject"]["identifier"]["value"] == "SECRET-ID", "the EHR matches the FHIR report on the patient ID"
    with session_scope(pg_url) as session:
        rows = [(r.destination, r.state, r.attempts, r.last_error) for r in session.query(Delivery).all()]
        assert session.get(Study, study_id).state == StudyState.EXPORTED, f"deliveries: {rows}"
    with pytest.raises(Superseded):
        export_step(settings, study_id)  # a second delivery does nothing


def test_unreachable_webhook_leaves_a_pending_delivery(pg_url: str, tmp_path: Path) -> None:
    from tests.support.procs import free_port

    settings = Settings(database_url=pg_url, data_dir=tmp_path, webhook_url=f"http://127.0.0.1:{free_port()}/x")
    study_id = _drafted_study(pg_url)
    outcome = export_step(settings, study_id)  # no exception: the delivery row carries the retry
    assert outcome.state == StudyState.DRAFTED
    with session_scope(pg_url) as session:
        assert session.get(Study, study_id).state == StudyState.DRAFTED, "not exported, so it will be retried"
        [row] = session.query(Delivery).all()
        assert (row.destination, row.state, row.attempts) == ("webhook", DeliveryState.PENDING, 1)
        assert "unreachable" in (row.last_error or "") and row.next_attempt_at > row.created_at


def test_export_without_report_is_bad_input(pg_url: str, tmp_path: Path) -> None:
    with session_scope(pg_url) as session:
        study = Study(study_instance_uid="1.2.3.5", state=StudyState.DRAFTED)
        session.add(study)
        session.flush()
        study_id = study.id
    with pytest.raises(BadInput):
        export_step(Settings(database_url=pg_url, data_dir=tmp_path, export_fhir=True), study_id)

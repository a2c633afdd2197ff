"""Exporters: a FHIR DiagnosticReport file and a signed webhook per drafted study."""

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
from preread.schemas.tables import Report, Study, StudyState
from preread.worker.exporters.step import SIGNATURE_HEADER, export_step
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
    resource = json.loads((tmp_path / "exports" / "1.2.3.4.json").read_text())
    assert resource["resourceType"] == "DiagnosticReport" and resource["status"] == "preliminary"
    assert resource["conclusion"] == "Normal."
    headers, body = _Sink.received[0]
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    payload = json.loads(body)
    assert payload["study_instance_uid"] == "1.2.3.4" and payload["accession_number"] == "ACC1"
    assert "SECRET-ID" not in body.decode() and "SECRET-ID" not in json.dumps(resource), "no patient ID leaves"
    with session_scope(pg_url) as session:
        assert session.get(Study, study_id).state == StudyState.EXPORTED
    with pytest.raises(Superseded):
        export_step(settings, study_id)  # a second delivery does nothing


def test_unreachable_webhook_is_a_transient_error(pg_url: str, tmp_path: Path) -> None:
    from tests.support.procs import free_port

    settings = Settings(database_url=pg_url, data_dir=tmp_path, webhook_url=f"http://127.0.0.1:{free_port()}/x")
    study_id = _drafted_study(pg_url)
    with pytest.raises(ConnectionError):
        export_step(settings, study_id)
    with session_scope(pg_url) as session:
        assert session.get(Study, study_id).state == StudyState.DRAFTED, "not exported, so it will be retried"


def test_export_without_report_is_bad_input(pg_url: str, tmp_path: Path) -> None:
    with session_scope(pg_url) as session:
        study = Study(study_instance_uid="1.2.3.5", state=StudyState.DRAFTED)
        session.add(study)
        session.flush()
        study_id = study.id
    with pytest.raises(BadInput):
        export_step(Settings(database_url=pg_url, data_dir=tmp_path, export_fhir=True), study_id)

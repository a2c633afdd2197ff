"""Drafted studies made directly in the database, with a real source file on disk, for exporter tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import update

from preread.ingest.assembly.catalog import record_instance
from preread.schemas.database import session_scope
from preread.schemas.tables import Finding, ProbeScore, Report, Study, StudyState
from tests.support.synthetic import projection, save

PROBES = {"pneumothorax": 0.91, "pleural_effusion": 0.12, "cardiomegaly": 0.55}
FINDINGS = [("Small left apical pneumothorax", "lung apex", "left", "present", "mild"),
            ("No pleural effusion", "pleura", "bilateral", "absent", "none")]
PATIENT = ("Roe^Richard", "MRN-4711")


def drafted_study(url: str, folder: Path, n: int = 0, impression: str = "Left pneumothorax.") -> tuple[int, str]:
    """A chest CR in DRAFTED state with a current report, findings and probe scores; (study id, study UID)."""
    study_uid = str(generate_uid())
    ds = projection(study_uid=study_uid, series_uid=str(generate_uid()), series_number=1, instance_number=1, view="PA")
    ds.PatientName, ds.PatientID = PATIENT
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime, ds.BodyPartExamined = f"ACC{n:05d}", "20261130", "080000", "CHEST"
    path = save(ds, folder, f"cr{n}.dcm")
    with session_scope(url) as session:
        study_id, _ = record_instance(session, ds, path, path.stat().st_size, source="draft")
        session.execute(update(Study).where(Study.id == study_id).values(state=StudyState.DRAFTED, urgency="stat"))
        report = Report(study_id=study_id, current=True, draft_text="Findings: ...", impression=impression,
                        raw_output="{}", parse_status="ok", model_id="tiny/model", prompt_version="preread-1+abc",
                        model_revision="r1")
        report.findings = [Finding(ordinal=i, text=t, anatomy=a, laterality=lat, presence=p, severity=sev)
                           for i, (t, a, lat, p, sev) in enumerate(FINDINGS)]
        session.add(report)
        session.add_all(ProbeScore(study_id=study_id, condition=c, question=f"Is there {c}?", score=s, current=True,
                                   model_id="tiny/model", prompt_version="preread-1+abc") for c, s in PROBES.items())
    return study_id, study_uid


class Recorder:
    """A small HTTP server that records every POST; ``status`` sets what it answers."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if recorder.status < 300:
                    recorder.received.append((self.path, dict(self.headers), body))
                reply = json.dumps({"resourceType": "Bundle", "type": "transaction-response"}).encode()
                self.send_response(recorder.status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

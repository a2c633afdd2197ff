"""Exporters: push a drafted study's current report to the reading side.

A FHIR R4 DiagnosticReport (status ``preliminary``: a machine draft awaiting a
radiologist) written under the data dir, and a JSON webhook signed with
HMAC-SHA256 in ``X-Preread-Signature``. Neither carries a patient name or ID:
the receiver matches on Study Instance UID and accession number.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.request
from typing import Any

from preread.ingest.storage.files import write_atomic
from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Study, StudyState
from preread.worker.pipeline.stages import EXPORTABLE, BadInput, StepOutcome, Superseded, current_report, set_state, study_in_state

SIGNATURE_HEADER = "X-Preread-Signature"


def fhir_diagnostic_report(study: Study, report: Any) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport for a draft: preliminary, conclusion = impression."""
    return {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"text": study.study_description or "Imaging study"},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"}],
        "issued": report.created_at.isoformat(),
        "conclusion": report.impression or "",
        "extension": [
            {"url": "urn:preread:model", "valueString": report.model_id},
            {"url": "urn:preread:prompt-version", "valueString": report.prompt_version},
            {"url": "urn:preread:urgency", "valueString": study.urgency or "routine"},
        ],
        "text": {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\"><pre>{_xml_escape(report.draft_text or report.raw_output)}</pre></div>"},
    }


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sign(body: bytes, secret: str) -> str:
    """The webhook signature: ``sha256=<hex HMAC of the body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_webhook(url: str, payload: dict[str, Any], secret: str | None, timeout: float = 10.0) -> None:
    """POST ``payload`` as JSON; raises ``ConnectionError`` on failure so the task retries."""
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (URL from settings)
            if response.status >= 300:
                raise ConnectionError(f"webhook answered {response.status}")
    except OSError as exc:
        raise ConnectionError(f"webhook unreachable: {type(exc).__name__}") from exc


#: Destinations an export can go to, by the name ``preread export --destination`` takes.
DESTINATIONS = ("fhir", "webhook")
#: States whose draft may be sent: DRAFTED by the pipeline, and EXPORTED again by ``preread export``.
RESENDABLE = (StudyState.DRAFTED, StudyState.EXPORTED)


def enabled_destinations(settings: Settings) -> list[str]:
    """The destinations the settings switch on."""
    return [name for name, on in (("fhir", settings.export_fhir), ("webhook", bool(settings.webhook_url))) if on]


def export_step(settings: Settings, study_id: int, *, destinations: list[str] | None = None, resend: bool = False) -> StepOutcome:
    """Export the current report of a DRAFTED study (or an EXPORTED one with ``resend``); it becomes EXPORTED.

    Sending is idempotent: the same draft gives the same FHIR file and the same
    webhook body, which receivers match on the Study Instance UID.
    """
    allowed = RESENDABLE if resend else EXPORTABLE
    chosen = enabled_destinations(settings) if destinations is None else destinations
    with session_scope(settings.effective_database_url) as session:
        study = study_in_state(session, study_id, allowed)
        report = current_report(session, study_id)
        if report is None:
            raise BadInput("drafted study has no current report")
        resource = fhir_diagnostic_report(study, report)
        payload = {
            "event": "draft.ready",
            "study_instance_uid": study.study_instance_uid,
            "accession_number": study.accession_number,
            "urgency": study.urgency,
            "report": {"draft": report.draft_text, "structured": report.structured, "parse_status": report.parse_status},
        }
        uid = study.study_instance_uid
    if "fhir" in chosen:
        write_atomic(settings.exports_dir / f"{uid}.json", [json.dumps(resource, indent=2).encode()])
    if "webhook" in chosen:
        if not settings.webhook_url:
            raise BadInput("the webhook destination needs PREREAD_WEBHOOK_URL")
        post_webhook(settings.webhook_url, payload, settings.webhook_secret)
    with session_scope(settings.effective_database_url) as session:
        moved = set_state(session, study_id, StudyState.EXPORTED, expect=allowed)
        if not moved:
            raise Superseded(f"study {study_id} changed state while exporting")
    return StepOutcome(study_id, StudyState.EXPORTED)


def record_export_failure(settings: Settings, study_id: int, reason: str) -> None:
    """Record why an export failed beside the draft; the study keeps its state (a draft is never FAILED by export)."""
    from sqlalchemy import update

    with session_scope(settings.effective_database_url) as session:
        session.execute(
            update(Study).where(Study.id == study_id, Study.state.in_([str(s) for s in RESENDABLE]))
            .values(error=f"export: {reason}"[:2000])
        )

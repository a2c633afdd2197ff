"""The draft as a FHIR transaction Bundle, built and validated with fhir.resources, and its exporter.

The Bundle holds a DiagnosticReport (``preliminary``, ``conclusion`` the impression, the
patient as ``subject`` by identifier, the study by Study Instance UID), one Observation per
triage probe (probability, interpretation at the probe's threshold) and per finding, a
Device for the model and a Provenance naming the Device as author. Every resource carries
the security label AIAST (asserted by an AI). Entries are conditional creates keyed on
identifiers derived from the study and report, so posting the same Bundle twice creates
nothing new. R4 and R4B share these resources; both validate with fhir.resources' R4B models
(fhir.resources 8 ships R4B, R5 and STU3, not a separate R4 package). ``PREREAD_FHIR_VERSION=R5``
writes R5 (Device ``name``/``modelNumber``, Provenance ``authorization``) and validates with R5 models.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

import importlib
from pydicom.uid import generate_uid

from preread.schemas.settings import Settings
from preread.worker.exporters.base import SendResult, register
from preread.worker.exporters.context import Concept, ExportContext
from preread.worker.exporters.http import bearer, post
from preread.worker.exporters.sr import device_observer_uid, package_version, sr_instance_uid

DICOM_UID_SYSTEM = "urn:dicom:uid"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
PRIVATE_CONCEPTS = "urn:infimed-preread:concept"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
PROVENANCE_AGENT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
#: HL7 security label: "Artificial Intelligence asserted".
AI_ASSERTED = {"system": OBSERVATION_VALUE, "code": "AIAST", "display": "Artificial Intelligence asserted"}
FHIR_CONTENT_TYPE = "application/fhir+json"
_NS = uuid.UUID("6f1d7c8e-8f8a-4c5e-9a55-3b8d1d1f6a01")

SCHEMES = {"SCT": SNOMED, "LN": LOINC, "UCUM": UCUM}


def bundle_model(version: str) -> Any:
    """fhir.resources' Bundle model of a FHIR release: R4 and R4B validate with the R4B models, R5 with the default."""
    module = "fhir.resources.bundle" if version == "R5" else "fhir.resources.R4B.bundle"
    return importlib.import_module(module).Bundle


def _urn(*parts: object) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, '|'.join(str(p) for p in parts))}"


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _coding(concept: Concept) -> dict[str, str]:
    return {"system": SCHEMES.get(concept.scheme, PRIVATE_CONCEPTS), "code": concept.code, "display": concept.meaning}


def _meta() -> dict[str, Any]:
    return {"security": [dict(AI_ASSERTED)]}


def patient_reference(ctx: ExportContext, settings: Settings) -> dict[str, Any] | None:
    """The patient by identifier (system from ``PREREAD_PATIENT_ID_SYSTEM``), as the receiving EHR matches it.

    ``None`` for a study without a Patient ID: ``subject`` is optional in every FHIR release, and the
    EHR still matches the report by the study's identifier and accession number.
    """
    if not (ctx.patient_id or "").strip():
        return None
    identifier: dict[str, str] = {"value": ctx.patient_id or ""}
    if settings.patient_id_system:
        identifier["system"] = settings.patient_id_system
    return {"type": "Patient", "identifier": identifier}


def build_bundle(ctx: ExportContext, settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """The transaction Bundle of one report, validated; returned as JSON-ready data."""
    now = now or datetime.now(timezone.utc)
    r5 = settings.fhir_version == "R5"
    issued = ctx.report_created_at.isoformat()
    subject = patient_reference(ctx, settings)
    report_uid = sr_instance_uid(ctx.study_instance_uid, ctx.report_id, ctx.report_created_at)
    device_uid = device_observer_uid(ctx.model_id, ctx.model_revision, ctx.prompt_version)
    device_url = _urn("device", device_uid)
    device_ref = {"reference": device_url, "type": "Device"}
    entries: list[dict[str, Any]] = []

    def add(full_url: str, resource: dict[str, Any], identifier: dict[str, str]) -> None:
        resource["identifier"] = [identifier]
        entries.append({
            "fullUrl": full_url,
            "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"],
                        "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}"},
        })

    add(device_url, {
        "resourceType": "Device",
        "meta": _meta(),
        "manufacturer": "infimed-preread",
        **({"name": [{"value": ctx.model_id, "type": "user-friendly-name"}], "modelNumber": ctx.model_id}
           if r5 else {"deviceName": [{"name": ctx.model_id, "type": "model-name"}]}),
        "type": [{"text": "AI pre-read model (vision-language)"}] if r5 else {"text": "AI pre-read model (vision-language)"},
        "version": [
            {"type": {"text": "software"}, "value": package_version()},
            {"type": {"text": "model revision"}, "value": ctx.model_revision or "unpinned"},
            {"type": {"text": "prompt version"}, "value": ctx.prompt_version},
        ],
    }, {"system": DICOM_UID_SYSTEM, "value": _oid(device_uid)})

    results: list[dict[str, str]] = []
    for probe in ctx.probes:
        uid = str(generate_uid(entropy_srcs=["preread-probe", ctx.study_instance_uid, str(ctx.report_id), probe.condition]))
        url = _urn("probe", uid)
        results.append({"reference": url, "type": "Observation"})
        add(url, {
            "resourceType": "Observation",
            "meta": _meta(),
            "status": "preliminary",
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
            "code": {"coding": [_coding(probe.concept)], "text": probe.question},
            **({"subject": subject} if subject else {}),
            "issued": issued,
            "device": device_ref,
            "valueQuantity": {"value": round(probe.score, 6), "unit": "probability", "system": UCUM, "code": "1"},
            "interpretation": [{
                "coding": [{"system": INTERPRETATION, "code": "POS" if probe.present else "NEG",
                            "display": "Positive" if probe.present else "Negative"}],
                "text": f"{'present' if probe.present else 'absent'} at threshold {probe.threshold:.2f}",
            }],
        }, {"system": DICOM_UID_SYSTEM, "value": _oid(uid)})
    for i, finding in enumerate(ctx.findings):
        uid = str(generate_uid(entropy_srcs=["preread-finding", ctx.study_instance_uid, str(ctx.report_id), str(i)]))
        url = _urn("finding", uid)
        results.append({"reference": url, "type": "Observation"})
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": _meta(),
            "status": "preliminary",
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
            "code": {"coding": [{"system": LOINC, "code": "59776-5", "display": "Procedure findings"}], "text": "Finding"},
            **({"subject": subject} if subject else {}),
            "issued": issued,
            "device": device_ref,
            "valueString": finding.text,
        }
        site = " ".join(p for p in (finding.laterality if finding.laterality not in (None, "none") else None, finding.anatomy) if p)
        if site:
            observation["bodySite"] = {"text": site}
        notes = [f"{k}: {v}" for k, v in (("presence", finding.presence), ("severity", finding.severity)) if v and v != "none"]
        if notes:
            observation["note"] = [{"text": "; ".join(notes)}]
        add(url, observation, {"system": DICOM_UID_SYSTEM, "value": _oid(uid)})

    report_url = _urn("report", report_uid)
    add(report_url, {
        "resourceType": "DiagnosticReport",
        "meta": _meta(),
        "status": "preliminary",
        "category": [{"coding": [{"system": DIAGNOSTIC_SERVICE, "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": ctx.study_description or "Imaging study"},
        **({"subject": subject} if subject else {}),
        "issued": issued,
        ("study" if r5 else "imagingStudy"): [{"type": "ImagingStudy",
                                               "identifier": {"system": DICOM_UID_SYSTEM, "value": _oid(ctx.study_instance_uid)}}],
        "result": results,
        "conclusion": ctx.impression or ctx.draft_text or "",
    }, {"system": DICOM_UID_SYSTEM, "value": _oid(report_uid)})
    if ctx.accession_number:
        entries[-1]["resource"]["identifier"].append({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": ctx.accession_number,
        })

    targets = [{"reference": e["fullUrl"]} for e in entries if e["resource"]["resourceType"] != "Device"]
    provenance_url = _urn("provenance", report_uid)
    entries.append({
        "fullUrl": provenance_url,
        "resource": {
            "resourceType": "Provenance",
            "meta": _meta(),
            "target": targets,
            "recorded": now.isoformat(),
            ("authorization" if r5 else "reason"): [
                {"concept": {"coding": [dict(AI_ASSERTED)]}} if r5 else {"coding": [dict(AI_ASSERTED)]}
            ],
            "agent": [{
                "type": {"coding": [{"system": PROVENANCE_AGENT, "code": "author", "display": "Author"}]},
                "who": device_ref,
            }],
        },
        "request": {"method": "POST", "url": "Provenance"},
    })
    bundle = {"resourceType": "Bundle", "type": "transaction", "timestamp": now.isoformat(), "entry": entries}
    bundle_model(settings.fhir_version).model_validate(bundle)  # raises pydantic.ValidationError if malformed
    return bundle


def bundle_json(ctx: ExportContext, settings: Settings) -> bytes:
    """The Bundle as UTF-8 JSON."""
    return json.dumps(build_bundle(ctx, settings), indent=2).encode()


@register("fhir")
class FhirExporter:
    """POSTs the transaction Bundle to a FHIR server's base URL."""

    def __init__(self, destination: Any) -> None:
        self.destination = destination

    def send(self, ctx: ExportContext, settings: Settings) -> SendResult:
        """One transaction; the server applies it all or nothing."""
        headers = {"Content-Type": FHIR_CONTENT_TYPE, "Accept": FHIR_CONTENT_TYPE, **bearer(self.destination.token)}
        post(self.destination.url.rstrip("/"), bundle_json(ctx, settings), headers, self.destination.timeout,
             f"FHIR server {self.destination.name!r}")
        return SendResult()

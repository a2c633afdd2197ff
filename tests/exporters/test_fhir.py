"""FHIR: the transaction Bundle posted to a FHIR server validates, and its references resolve inside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState, Study, StudyState
from preread.worker.exporters.deliveries import deliver_due
from tests.support.procs import wait_until
from tests.support.drafted import FINDINGS, PATIENT, PROBES, Recorder, drafted_study

MRN_SYSTEM = "urn:oid:1.2.3.4.5.6.7"


def _references(node: Any) -> list[str]:
    """Every ``reference`` string anywhere in a resource."""
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_bundle_posted_to_fhir_server(pg_url: str, tmp_path: Path, version: str) -> None:
    study_id, study_uid = drafted_study(pg_url, tmp_path / "src")
    with Recorder() as server:
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", patient_id_system=MRN_SYSTEM, fhir_version=version,
                            destinations=[{"name": "ehr", "kind": "fhir", "url": server.url + "/fhir", "token": "t0k"}])
        deliver_due(settings, wait=True)
    [(path, headers, body)] = server.received
    assert path == "/fhir" and headers["Content-Type"] == "application/fhir+json"
    assert headers["Authorization"] == "Bearer t0k"
    bundle = json.loads(body)
    (R5Bundle if version == "R5" else Bundle).model_validate(bundle)
    assert bundle["type"] == "transaction"
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
        assert entry["request"]["method"] == "POST"
        assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
                "display": "Artificial Intelligence asserted"} in entry["resource"]["meta"]["security"]
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    for entry in bundle["entry"]:
        for ref in _references(entry["resource"]):
            assert ref in full_urls, f"{ref} does not resolve inside the Bundle"
    [report] = by_type["DiagnosticReport"]
    assert report["status"] == "preliminary" and report["conclusion"] == "Left pneumothorax."
    assert report["subject"] == {"type": "Patient", "identifier": {"system": MRN_SYSTEM, "value": PATIENT[1]}}
    assert report["study" if version == "R5" else "imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    assert len(report["result"]) == len(PROBES) + len(FINDINGS)
    probes = {o["code"]["coding"][0]["display"]: o for o in by_type["Observation"] if "valueQuantity" in o}
    assert {round(o["valueQuantity"]["value"], 6) for o in probes.values()} == set(PROBES.values())
    for obs in probes.values():
        positive = obs["valueQuantity"]["value"] >= settings.priority_threshold
        assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if positive else "NEG")
    assert probes["Pneumothorax"]["code"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "36118008",
                                                           "display": "Pneumothorax"}
    assert sorted(o["valueString"] for o in by_type["Observation"] if "valueString" in o) == sorted(f[0] for f in FINDINGS)
    [device] = by_type["Device"]
    names = device["name"][0]["value"] if version == "R5" else device["deviceName"][0]["name"]
    assert names == "tiny/model" and device["manufacturer"] == "infimed-preread"
    [provenance] = by_type["Provenance"]
    device_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    assert provenance["agent"][0]["who"]["reference"] == device_url
    assert {t["reference"] for t in provenance["target"]} == full_urls - {device_url, next(
        e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance")}
    assert PATIENT[0] not in body.decode(), "the Bundle names the patient by identifier only"
    with session_scope(pg_url) as session:
        assert session.get(Study, study_id).state == StudyState.EXPORTED
        [row] = session.scalars(select(Delivery)).all()
        assert (row.state, row.attempts) == (DeliveryState.DELIVERED, 1)


def test_fhir_server_refusing_the_bundle_fails_the_delivery_and_an_outage_retries(pg_url: str, tmp_path: Path) -> None:
    study_id, _ = drafted_study(pg_url, tmp_path / "src")
    with Recorder() as server:
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", delivery_backoff_max=0.2,
                            destinations=[{"name": "ehr", "kind": "fhir", "url": server.url}])
        server.status = 503
        deliver_due(settings, wait=True)
        with session_scope(pg_url) as session:
            [row] = session.scalars(select(Delivery)).all()
            assert (row.state, row.attempts, row.last_error) == (DeliveryState.PENDING, 1, "FHIR server 'ehr' answered HTTP 503")
            assert session.get(Study, study_id).state == StudyState.DRAFTED
        server.status = 200
        wait_until(lambda: deliver_due(settings, wait=True) >= 0 and server.received, 30, interval=0.1,
                   what="the retry after the backoff")
        assert len(server.received) == 1
        other_id, _ = drafted_study(pg_url, tmp_path / "src", n=1)
        server.status = 422
        deliver_due(settings, wait=True)
    with session_scope(pg_url) as session:
        states = dict(session.execute(select(Delivery.study_id, Delivery.state)).all())
        assert states == {study_id: DeliveryState.DELIVERED, other_id: DeliveryState.FAILED}
        assert session.get(Study, other_id).state == StudyState.EXPORTED, "every destination finished (one gave up)"


def test_delivery_summary_per_destination(pg_url: str, tmp_path: Path) -> None:
    from preread.worker.exporters.deliveries import summary

    study_id, _ = drafted_study(pg_url, tmp_path / "src")
    drafted_study(pg_url, tmp_path / "src", n=1)
    with Recorder() as server:
        server.status = 503
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", destinations=[
            {"name": "ehr", "kind": "fhir", "url": server.url},
            {"name": "files", "kind": "folder", "path": str(tmp_path / "out")},
        ])
        deliver_due(settings, wait=True)
    with session_scope(pg_url) as session:
        assert summary(session) == [("ehr", "pending", 2), ("files", "delivered", 2)]
        assert summary(session, study_id) == [("ehr", "pending", 1), ("files", "delivered", 1)]


def test_study_without_patient_id_is_delivered_without_a_subject(pg_url: str, tmp_path: Path) -> None:
    """A study with no Patient ID still reaches the EHR (matched by study and accession), never retried for ever."""
    from sqlalchemy import update

    study_id, study_uid = drafted_study(pg_url, tmp_path / "src")
    with session_scope(pg_url) as session:
        session.execute(update(Study).where(Study.id == study_id).values(patient_id=None))
    with Recorder() as server:
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", patient_id_system=MRN_SYSTEM,
                            destinations=[{"name": "ehr", "kind": "fhir", "url": server.url + "/fhir"}])
        deliver_due(settings, wait=True)
    [(_, _, body)] = server.received
    bundle = json.loads(body)
    Bundle.model_validate(bundle)
    [report] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert "subject" not in report
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    with session_scope(pg_url) as session:
        [row] = session.scalars(select(Delivery)).all()
        assert row.state == DeliveryState.DELIVERED

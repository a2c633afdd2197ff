"""DICOM SR to a real PACS: drafted CT and CR studies delivered to Orthanc, read back and checked.

The source studies are in Orthanc first (as a modality would have sent them), so the test can
see the SRs filed under the same patient and study. Each SR is parsed with highdicom, printed
by dcmtk's ``dsrdump`` and checked by dicom3tools' ``dciodvfy``; its probe probabilities,
verification flag and series description are the ones in the database.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState, ProbeScore, Report, Study, StudyState
from preread.worker.exporters.deliveries import deliver_due, resend
from preread.worker.exporters.sr import SERIES_DESCRIPTION
from tests.conftest import testdata
from tests.support.orthanc import ORTHANC, Orthanc
from tests.support.procs import base_env, preread_argv
from tests.support.synthetic import projection, save

pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")

CR_PATIENT = ("Doe^Jane", "PAT-CR-77")
CT_PATIENT = ("CompressedSamples^CT1", "1CT1")  # pydicom's CT_small.dcm


def _studies(folder: Path) -> list[Path]:
    """A real CT file and a synthetic chest CR with a complete patient/study header."""
    ct = folder / "ct" / "ct.dcm"
    ct.parent.mkdir(parents=True)
    shutil.copy(testdata("CT_small.dcm"), ct)
    cr = projection(study_uid=str(generate_uid()), series_uid=str(generate_uid()), series_number=1, instance_number=1, view="PA")
    cr.PatientName, cr.PatientID = CR_PATIENT
    cr.PatientBirthDate, cr.PatientSex = "19700101", "F"
    cr.AccessionNumber, cr.StudyID, cr.StudyDate, cr.StudyTime = "ACC-CR-1", "1", "20261130", "101500"
    cr.ReferringPhysicianName, cr.BodyPartExamined = "", "CHEST"
    return [ct, save(cr, folder / "cr", "cr.dcm")]


def _draft(folder: Path, db_url: str, data: Path, model: Path) -> None:
    result = subprocess.run(
        preread_argv("draft", str(folder)),
        env=base_env(database_url=db_url, data_dir=data, model=model, max_images=2),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr


def _storescu(orthanc: Orthanc, files: list[Path]) -> None:
    subprocess.run(["storescu", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                   check=True, capture_output=True, timeout=120)


def _srs(orthanc: Orthanc) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID → (Orthanc instance id, file bytes) of every SR in Orthanc."""
    out = {}
    for iid in orthanc.instances():
        tags = orthanc.get(f"/instances/{iid}/simplified-tags")
        if tags.get("Modality") == "SR":
            out[tags["SOPInstanceUID"]] = (iid, orthanc.get_bytes(f"/instances/{iid}/file"))
    return out


def _probabilities(sr: hd.sr.Comprehensive3DSR) -> dict[str, tuple[float, str]]:
    """Tracking identifier's condition → (probability, present/absent meaning) from the TID 1500 groups."""
    out = {}
    for group in sr.content.get_image_measurement_groups():
        condition = group.tracking_identifier.removeprefix("probe ")
        [measurement] = group.get_measurements()
        [evaluation] = group.get_qualitative_evaluations()
        out[condition] = (float(measurement.value), evaluation.value.meaning)
    return out


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def test_drafted_ct_and_cr_arrive_in_orthanc_as_sr(pg_url: str, tiny_model_dir: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    sources = _studies(tmp_path / "in")
    _draft(tmp_path / "in", pg_url, tmp_path / "data", tiny_model_dir)
    headers = [dcmread(p, stop_before_pixels=True) for p in sources]
    patients = {h.StudyInstanceUID: (str(h.PatientName), h.PatientID) for h in headers}
    assert set(patients.values()) == {CR_PATIENT, CT_PATIENT}
    with Orthanc(tmp_path / "orthanc") as orthanc:
        _storescu(orthanc, sources)
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", destinations=[
            {"name": "pacs", "kind": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port},
        ])
        with caplog.at_level(logging.DEBUG):
            deliver_due(settings, wait=True)
        srs = _srs(orthanc)
        with session_scope(pg_url) as session:
            seen = [(r.destination, r.state, r.last_error) for r in session.scalars(select(Delivery))]
        assert len(srs) == 2, f"one SR per drafted study; deliveries: {seen}"

        with session_scope(pg_url) as session:
            studies = {s.study_instance_uid: s for s in session.scalars(select(Study))}
            assert {s.state for s in studies.values()} == {StudyState.EXPORTED}
            rows = session.scalars(select(Delivery)).all()
            assert [(r.destination, r.state, r.attempts) for r in rows] == [("pacs", DeliveryState.DELIVERED, 1)] * 2
            scores = {
                s.study_instance_uid: {p.condition: p.score for p in session.scalars(
                    select(ProbeScore).where(ProbeScore.study_id == s.id, ProbeScore.current.is_(True)))}
                for s in studies.values()
            }

        for sop_uid, (iid, data) in srs.items():
            ds = dcmread(io.BytesIO(data))
            sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
            assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"
            assert sr.SeriesDescription == SERIES_DESCRIPTION
            assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
            assert sr.Manufacturer == "infimed-preread"
            assert any(item.Manufacturer == "infimed-preread" and item.ManufacturerModelName == str(tiny_model_dir)[-64:]
                       for item in sr.ContributingEquipmentSequence), "the algorithm is named as contributing equipment"
            expected = scores[sr.StudyInstanceUID]
            got = _probabilities(sr)
            assert set(got) == set(expected) and expected, "one measurement group per probe of the study"
            for condition, (value, verdict) in got.items():
                assert value == pytest.approx(expected[condition], abs=1e-6)
                assert verdict == ("Present" if expected[condition] >= settings.priority_threshold else "Absent")
            # Filed under the source's patient and study in the PACS.
            assert (str(ds.PatientName), ds.PatientID) == patients[sr.StudyInstanceUID]
            parent_study = orthanc.get(f"/instances/{iid}/study")
            source_studies = [s for s in orthanc.get("/studies?expand")
                              if s["MainDicomTags"]["StudyInstanceUID"] == sr.StudyInstanceUID]
            assert [s["ID"] for s in source_studies] == [parent_study["ID"]]
            assert len(parent_study["Series"]) == 2, "the source series and the AI pre-read series"
            evidence = {ref.ReferencedSOPInstanceUID for item in ds.CurrentRequestedProcedureEvidenceSequence
                        for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
            assert evidence == {h.SOPInstanceUID for h in headers if h.StudyInstanceUID == sr.StudyInstanceUID}
            path = tmp_path / f"{sop_uid}.dcm"
            path.write_bytes(data)
            dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
            assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout and "Impression" in dump.stdout
            errors, warnings = _dciodvfy(path)
            assert errors == [], "\n".join(errors)
            print(f"dciodvfy warnings for the {sr.StudyInstanceUID} SR:", *warnings, sep="\n  ")

        for name, pid in (CR_PATIENT, CT_PATIENT):
            assert name not in caplog.text and pid not in caplog.text, "no patient name or ID in the logs"

        # A re-draft: a new SR in the same series that points at the one it replaces; resending stores no duplicate.
        _draft(tmp_path / "in", pg_url, tmp_path / "data", tiny_model_dir)
        deliver_due(settings, wait=True)
        after = _srs(orthanc)
        assert len(after) == 4
        for sop_uid in set(after) - set(srs):
            ds = dcmread(io.BytesIO(after[sop_uid][1]))
            [older] = [dcmread(io.BytesIO(srs[u][1])) for u in srs
                       if dcmread(io.BytesIO(srs[u][1])).StudyInstanceUID == ds.StudyInstanceUID]
            assert ds.SeriesInstanceUID == older.SeriesInstanceUID and ds.InstanceNumber == older.InstanceNumber + 1
            [pre] = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
            assert pre.ReferencedSOPInstanceUID == older.SOPInstanceUID
        with session_scope(pg_url) as session:
            assert resend(session) == 2
        deliver_due(settings, wait=True)
        uids = orthanc.sop_instance_uids()
        assert len(uids) == len(set(uids)) == 6, "a resend stores the same SOP instance again, never a duplicate"
        with session_scope(pg_url) as session:
            current = select(Report.id).where(Report.current.is_(True))
            states = session.scalars(select(Delivery.state).where(Delivery.report_id.in_(current))).all()
            assert states == [DeliveryState.DELIVERED] * 2


def test_basic_text_sr_is_valid(pg_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    _studies(tmp_path / "in")
    _draft(tmp_path / "in", pg_url, tmp_path / "data", tiny_model_dir)
    out = tmp_path / "out"
    settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", sr_template="basic-text",
                        destinations=[{"name": "files", "kind": "folder", "path": str(out), "sends": ["sr"]}])
    deliver_due(settings, wait=True)
    files = sorted(out.glob("*.sr.dcm"))
    assert len(files) == 2
    for path in files:
        ds = dcmread(path)
        assert ds.SOPClassUID.name == "Basic Text SR Storage"
        assert ds.VerificationFlag == "UNVERIFIED" and ds.SeriesDescription == SERIES_DESCRIPTION
        errors, _ = _dciodvfy(path)
        assert errors == [], "\n".join(errors)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"Impression", dump) and "probability" in dump


def test_stow_rs_to_orthanc_dicomweb(pg_url: str, tmp_path: Path) -> None:
    from tests.support.drafted import PROBES, drafted_study

    _, study_uid = drafted_study(pg_url, tmp_path / "src")
    with Orthanc(tmp_path / "orthanc") as orthanc:
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data",
                            destinations=[{"name": "web", "kind": "dicomweb", "url": orthanc.dicomweb_url}])
        deliver_due(settings, wait=True)
        [iid] = orthanc.instances()
        ds = dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{iid}/file")))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    assert sr.StudyInstanceUID == study_uid and sr.SeriesDescription == SERIES_DESCRIPTION
    assert {k: v for k, (v, _) in _probabilities(sr).items()} == PROBES
    with session_scope(pg_url) as session:
        assert session.scalars(select(Delivery.state)).all() == [DeliveryState.DELIVERED]


def test_storage_commitment_confirms_the_delivery(pg_url: str, tmp_path: Path) -> None:
    """The PACS sends its N-EVENT-REPORT to ``preread listen``, which confirms the delivery row."""
    from tests.support.drafted import drafted_study
    from tests.support.procs import Proc, free_port, processes, wait_port, wait_until

    study_id, _ = drafted_study(pg_url, tmp_path / "src")
    port = free_port()
    with Orthanc(tmp_path / "orthanc", modalities={"preread": ["PREREAD", "127.0.0.1", port]}) as orthanc, \
            processes() as started:
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", ae_title="PREREAD", destinations=[
            {"name": "pacs", "kind": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
             "port": orthanc.dicom_port, "storage_commitment": True},
        ])
        # The listener's part: the real `preread listen` accepts the N-EVENT-REPORT the PACS sends back.
        env = base_env(database_url=pg_url, data_dir=tmp_path / "listen", ae_title="PREREAD")
        listener = Proc(preread_argv("listen", "--port", str(port)), env, tmp_path / "listen.log").start()
        started.append(listener)
        wait_port(port)
        deliver_due(settings, wait=True)

        def state() -> str:
            with session_scope(pg_url) as session:
                return str(session.scalars(select(Delivery.state)).one())

        wait_until(lambda: state() == DeliveryState.DELIVERED, 60, what="the storage commitment report")
        assert listener.alive() and len(orthanc.instances()) == 1
        assert "storage commitment" in listener.output() and "committed" in listener.output()
    with session_scope(pg_url) as session:
        row = session.scalars(select(Delivery)).one()
        assert row.commitment_uid and row.confirmed_at is not None and row.sent_at is not None
        assert session.get(Study, study_id).state == StudyState.EXPORTED

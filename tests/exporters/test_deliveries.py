"""Deliveries under faults: a PACS that hangs delays nothing else, and gets every pending result once when back."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState, Study, StudyState
from preread.worker.exporters.deliveries import deliver_due
from tests.support.drafted import Recorder, drafted_study
from tests.support.orthanc import Orthanc
from tests.support.procs import wait_until

N = 5


def _coordinator(settings: Settings, stop: threading.Event) -> None:
    """What the coordinator does each pass, on its own timer."""
    while not stop.is_set():
        deliver_due(settings)
        stop.wait(0.2)


def test_hung_pacs_delays_nothing_and_gets_every_result_once_when_back(pg_url: str, tmp_path: Path) -> None:
    studies = {drafted_study(pg_url, tmp_path / "src", n=i)[1] for i in range(N)}
    orthanc = Orthanc(tmp_path / "orthanc")
    hung = socket.socket()  # accepts connections on the PACS port and never answers
    hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hung.bind(("127.0.0.1", orthanc.dicom_port))
    hung.listen(16)
    stop = threading.Event()
    with Recorder() as ehr, Recorder() as hook:
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", delivery_backoff_max=1.0, destinations=[
            {"name": "pacs", "kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
             "timeout": 15},
            {"name": "ehr", "kind": "fhir", "url": ehr.url},
            {"name": "hook", "kind": "webhook", "url": hook.url, "secret": "s"},
        ])
        loop = threading.Thread(target=_coordinator, args=(settings, stop), daemon=True)
        loop.start()
        try:
            wait_until(lambda: len(ehr.received) == N and len(hook.received) == N, 60, what="the two live destinations")
            with session_scope(pg_url) as session:
                pacs = session.scalars(select(Delivery).where(Delivery.destination == "pacs")).all()
                assert len(pacs) == N and not [r for r in pacs if r.state == DeliveryState.DELIVERED]
                assert {s.state for s in session.scalars(select(Study))} == {StudyState.DRAFTED}
            hung.close()
            orthanc.start()
            wait_until(lambda: len(orthanc.instances()) >= N, 180, what="the pending SRs in Orthanc")

            def exported() -> bool:
                with session_scope(pg_url) as session:
                    return {s.state for s in session.scalars(select(Study))} == {StudyState.EXPORTED}

            wait_until(exported, 60, what="every study EXPORTED")
            stop.set()
            loop.join(30)
            uids = orthanc.sop_instance_uids()
            assert len(uids) == len(set(uids)) == N, "each pending result exactly once"
            assert {orthanc.get(f"/instances/{i}/simplified-tags")["StudyInstanceUID"] for i in orthanc.instances()} == studies
        finally:
            stop.set()
            loop.join(30)
            orthanc.stop()
    assert len(ehr.received) == len(hook.received) == N, "the live destinations got each result once"
    assert {json.loads(body)["study_instance_uid"] for _, _, body in hook.received} == studies
    with session_scope(pg_url) as session:
        rows = session.scalars(select(Delivery)).all()
        assert len(rows) == 3 * N and {r.state for r in rows} == {DeliveryState.DELIVERED}
        assert max(r.attempts for r in rows if r.destination == "pacs") >= 2, "the hung PACS delivery was retried"


def test_exporter_killed_mid_delivery_loses_nothing_and_stores_no_duplicate(pg_url: str, tmp_path: Path) -> None:
    import signal
    import subprocess

    from tests.support.procs import base_env, preread_argv

    n = 12
    studies = {drafted_study(pg_url, tmp_path / "src", n=i)[1] for i in range(n)}
    with Orthanc(tmp_path / "orthanc") as orthanc:
        destinations = [{"name": "pacs", "kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                         "port": orthanc.dicom_port, "timeout": 5}]
        exporter = subprocess.Popen(
            preread_argv("export"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=base_env(database_url=pg_url, data_dir=tmp_path / "data", destinations=json.dumps(destinations)),
        )
        try:
            wait_until(lambda: len(orthanc.instances()) >= 2, 120, interval=0.05, what="the first SRs in Orthanc")
        finally:
            exporter.send_signal(signal.SIGKILL)
            exporter.wait(30)
        with session_scope(pg_url) as session:
            undelivered = [r for r in session.scalars(select(Delivery)) if r.state != DeliveryState.DELIVERED]
        assert undelivered, "killed before it finished (more SRs than it had time for)"
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", destinations=destinations)

        def all_delivered() -> bool:
            deliver_due(settings, wait=True)
            with session_scope(pg_url) as session:
                return {r.state for r in session.scalars(select(Delivery))} == {DeliveryState.DELIVERED}

        wait_until(all_delivered, 120, interval=1.0, what="every delivery after the crash (the claimed one after its lease)")
        uids = orthanc.sop_instance_uids()
        assert len(uids) == len(set(uids)) == n, "nothing lost, no duplicate SOP Instance"
        assert {orthanc.get(f"/instances/{i}/simplified-tags")["StudyInstanceUID"] for i in orthanc.instances()} == studies


def test_coordinator_pass_delivers_drafted_studies(pg_url: str, tmp_path: Path) -> None:
    """The hook in the coordinator: a pass plans the rows and sends them in the background."""
    from celery import Celery

    from preread.worker.pipeline.coordinator import coordinate_once

    study_id, study_uid = drafted_study(pg_url, tmp_path / "src")
    settings = Settings(database_url=pg_url, data_dir=tmp_path / "data",
                        destinations=[{"name": "files", "kind": "folder", "sends": ["sr", "hl7"]}])
    coordinate_once(settings, Celery("unused", broker="memory://"), pass_no=1)
    wait_until(lambda: (settings.exports_dir / f"{study_uid}.hl7").exists(), 60, what="the coordinator's delivery")
    assert (settings.exports_dir / f"{study_uid}.sr.dcm").exists()

    def exported() -> bool:
        with session_scope(pg_url) as session:
            return session.get(Study, study_id).state == StudyState.EXPORTED

    wait_until(exported, 30, what="the study EXPORTED")

"""The SR over DICOM TLS (mutual): Orthanc as a TLS-only PACS that checks our client certificate."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState
from preread.worker.exporters.deliveries import deliver_due
from tests.support.drafted import drafted_study
from tests.support.orthanc import Orthanc
from tests.support.pki import make_pki


def test_sr_over_mutual_tls(pg_url: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    drafted_study(pg_url, tmp_path / "src", n=0)
    tls_only = {
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki / "server.pem"),
        "DicomTlsPrivateKey": str(pki / "server.key"), "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
        "DicomTlsRemoteCertificateRequired": True,
    }
    with Orthanc(tmp_path / "orthanc", extra=tls_only) as orthanc:
        base = {"kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port, "timeout": 10}
        settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", destinations=[
            {"name": "plain", **base},
            {"name": "tls", **base, "tls": {"ca": str(pki / "ca.pem"), "cert": str(pki / "client.pem"),
                                            "key": str(pki / "client.key")}},
        ])
        deliver_due(settings, wait=True)
        assert len(orthanc.instances()) == 1
    with session_scope(pg_url) as session:
        rows = {r.destination: r for r in session.scalars(select(Delivery))}
    assert rows["tls"].state == DeliveryState.DELIVERED
    assert rows["plain"].state == DeliveryState.PENDING and "association" in (rows["plain"].last_error or "")

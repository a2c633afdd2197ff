"""The SR over DICOM TLS (mutual): Orthanc as a TLS-only PACS that checks our client certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, DeliveryState
from preread.worker.exporters.deliveries import deliver_due
from tests.support.drafted import drafted_study
from tests.support.orthanc import Orthanc


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _pki(d: Path) -> Path:
    """A CA, a PACS certificate for 127.0.0.1 and a client certificate for us."""
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=preread test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def test_sr_over_mutual_tls(pg_url: str, tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
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

"""A private, real Orthanc on loopback for query/retrieve tests: temporary config, free ports, REST upload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from tests.support.procs import free_port, wait_until

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc as a PACS: DICOM on a free port, REST (and DICOMweb) on another, knowing our listener as a peer."""

    def __init__(self, workdir: Path | None = None, *, aet: str = "ORTHANC", peers: dict[str, tuple[str, int]] | None = None,
                 dicomweb: bool = False, limit_find_results: int = 0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.peers = peers or {}
        self.dicomweb = dicomweb
        self.limit_find_results = limit_find_results
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": "preread-test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True, "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: [ae, host, port] for ae, (host, port) in self.peers.items() for name in [ae.lower()]},
            "LimitFindResults": self.limit_find_results, "LimitFindInstances": 0, "StableAge": 1,
            "HttpServerEnabled": True, "DicomThreadsCount": 4, "StorageCompression": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"},
        }
        return config

    def start(self) -> Orthanc:
        assert ORTHANC, "Orthanc is not installed"
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config()))
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1"))
        wait_until(lambda: requests.get(f"{self.url}/system", timeout=2).ok, 180, what="Orthanc REST API")
        return self

    def upload(self, files: list[Path]) -> list[str]:
        """Store files over REST; returns Orthanc's instance ids."""
        ids = []
        for path in files:
            response = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=60)
            response.raise_for_status()
            ids.append(response.json()["ID"])
        return ids

    def instance_id(self, sop_instance_uid: str) -> str:
        found = requests.post(f"{self.url}/tools/lookup", data=sop_instance_uid, timeout=30).json()
        return next(item["ID"] for item in found if item["Type"] == "Instance")

    def delete_instance(self, sop_instance_uid: str) -> None:
        requests.delete(f"{self.url}/instances/{self.instance_id(sop_instance_uid)}", timeout=30).raise_for_status()

    def output(self) -> str:
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)
        time.sleep(0)

"""A private Orthanc on loopback for tests and benchmarks: DICOM, REST and the DICOMweb plugin.

Started from a temporary configuration on free ports; ``stop()`` and ``start()`` again keep its
storage, so a test can take the PACS down and bring it back with what it already holds.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.procs import free_port, wait_until

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """One Orthanc process with its own storage folder."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        if ORTHANC is None:
            raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "preread-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "DicomAet": ae_title, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomModalities": modalities or {}, "HttpServerEnabled": True, "StableAge": 60,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **(extra or {}),
        }
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config))

    @property
    def url(self) -> str:
        """The REST API root."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS at ``/studies``)."""
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        """Start (or restart) and wait until the REST API answers."""
        log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self.get("/system"), 60, what="Orthanc REST API")
        return self

    def stop(self) -> None:
        """Stop and wait for the process to exit; the storage stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource's raw bytes (an instance's ``/file``)."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return bytes(response.read())

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UID of every stored instance (a duplicate would show twice)."""
        return [self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()]

    def wait_count(self, n: int, timeout: float = 60.0) -> None:
        """Wait until Orthanc holds at least ``n`` instances."""
        wait_until(lambda: len(self.instances()) >= n, timeout, what=f"{n} instances in Orthanc")

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        time.sleep(0)

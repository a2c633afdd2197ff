"""A private, real Orthanc on loopback for tests and benchmarks: DICOM, REST and the DICOMweb plugin.

One class serves both uses: a PACS that receives our results (exporter tests, ``bench/export.py``)
and an archive we query and retrieve from (sweep tests, ``bench/sweep.py``). It runs from a
temporary configuration on free ports in its own folder under the one given; ``stop()`` and
``start()`` again keep its storage, so a test can take the PACS down and bring it back with what
it already holds. Peers it may send to (C-MOVE destinations, Storage Commitment reports) are
``peers`` (AE title → (host, port)) or, in Orthanc's own shape, ``modalities``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import requests

from tests.support.procs import free_port, wait_until

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """One Orthanc process with its own storage folder, knowing the given peers."""

    def __init__(self, folder: Path | None = None, ae_title: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None,
                 extra: dict[str, Any] | None = None, *, aet: str | None = None,
                 peers: dict[str, tuple[str, int]] | None = None, dicomweb: bool = True,
                 limit_find_results: int = 0) -> None:
        if ORTHANC is None:
            raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        #: Its own folder (configuration, storage, log), fresh even when two share a parent.
        self.folder = Path(tempfile.mkdtemp(prefix="orthanc-", dir=folder))
        self.ae_title = aet or ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        known = {ae.lower(): [ae, host, port] for ae, (host, port) in (peers or {}).items()}
        known.update(modalities or {})
        config: dict[str, Any] = {
            "Name": "preread-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "DicomAet": self.ae_title, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True, "DicomAlwaysAllowStore": True,
            "DicomModalities": known, "LimitFindResults": limit_find_results, "LimitFindInstances": 0,
            "StableAge": 1, "HttpServerEnabled": True, "DicomThreadsCount": 4, "StorageCompression": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb and DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"},
            **(extra or {}),
        }
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config))

    @property
    def aet(self) -> str:
        """Its AE title (the archive tests' name for it)."""
        return self.ae_title

    @property
    def workdir(self) -> Path:
        """Its folder (the archive tests' name for it)."""
        return self.folder

    @property
    def url(self) -> str:
        """The REST API root."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS at ``/studies``, QIDO-RS and WADO-RS below it)."""
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        """Start (or restart) and wait until the REST API answers."""
        assert ORTHANC, "Orthanc is not installed"
        log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, TCP_NODELAY="1"))
        log.close()
        wait_until(lambda: self.get("/system"), 180, what="Orthanc REST API")
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

    def output(self) -> str:
        """Its log so far."""
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- REST -------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource's raw bytes (an instance's ``/file``)."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return bytes(response.read())

    def upload(self, files: list[Path]) -> list[str]:
        """Store files over REST (as an archive already holding them); returns Orthanc's instance ids."""
        ids = []
        for path in files:
            response = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=60)
            response.raise_for_status()
            ids.append(response.json()["ID"])
        return ids

    def instance_id(self, sop_instance_uid: str) -> str:
        """Orthanc's id of the instance with this SOP Instance UID."""
        found = requests.post(f"{self.url}/tools/lookup", data=sop_instance_uid, timeout=30).json()
        return str(next(item["ID"] for item in found if item["Type"] == "Instance"))

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove one instance (an archive that lost it)."""
        requests.delete(f"{self.url}/instances/{self.instance_id(sop_instance_uid)}", timeout=30).raise_for_status()

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

"""Helpers for the listener tests: a real ``preread listen`` subprocess and its peers.

No tests here; the fixtures and helpers are imported by ``tests/test_listener*.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]
STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")
needs_dcmtk = pytest.mark.skipif(not (STORESCU and ECHOSCU), reason="dcmtk storescu/echoscu not installed")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def echo(port: int, *, calling: str = "ECHOSCU", timeout: int = 5) -> bool:
    """C-ECHO with dcmtk's echoscu; True when the listener answered success."""
    done = subprocess.run(
        [ECHOSCU or "echoscu", "-aet", calling, "-aec", "PREREAD", "-to", str(timeout), "-ta", str(timeout),
         "127.0.0.1", str(port)],
        capture_output=True, timeout=timeout * 3,
    )
    return done.returncode == 0


def storescu(port: int, files: list[Path], *extra: str, calling: str = "STORESCU", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Send ``files`` over one association with storescu (``-R``: propose what the files need, in their own
    transfer syntax; ``-nh``: keep going after a failure)."""
    return subprocess.run(
        [STORESCU or "storescu", "-aet", calling, "-aec", "PREREAD", "-nh", "-R", *extra, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=timeout,
    )


@dataclass
class ListenerProcess:
    """A running ``preread listen`` subprocess with its data dir and database."""

    port: int
    data_dir: Path
    database_url: str
    env: dict[str, str]
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[str] = field(default_factory=list)

    def start(self, wait: bool = True) -> ListenerProcess:
        """Start (or restart) the process and wait until it answers C-ECHO."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "preread.cli.main", "listen", "--port", str(self.port), *self.args],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        if wait:
            wait_for(lambda: self.alive() and echo(self.port), timeout=60, interval=0.2, what="listener C-ECHO")
        return self

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"listener exited: {self.log()[-3000:]}")
        return True

    def kill9(self) -> None:
        """SIGKILL the whole process group (the listener and any workers)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, sql: str, **params: Any) -> list[Any]:
        """Rows of ``sql`` on the listener's database."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql), params))
        finally:
            engine.dispose()

    def stored_files(self) -> list[Path]:
        root = self.data_dir / "studies"
        return sorted(root.rglob("*.dcm")) if root.exists() else []

    def quarantined(self) -> list[Path]:
        root = self.data_dir / "quarantine"
        return sorted(root.glob("*.dcm")) if root.exists() else []


def make_listener(tmp_path: Path, database_url: str, *, args: list[str] | None = None, **env: str) -> ListenerProcess:
    """A (not yet started) listener on a free port with a temp data dir."""
    data_dir = tmp_path / "data"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PREREAD_")}
    full_env.update(
        PREREAD_DATA_DIR=str(data_dir),
        PREREAD_DATABASE_URL=database_url,
        PREREAD_HOST="127.0.0.1",
        PREREAD_STABLE_AFTER="2",
        PREREAD_MIN_FREE_BYTES=str(16 * 1024 * 1024),
        PREREAD_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    full_env.update(env)
    return ListenerProcess(free_port(), data_dir, database_url, full_env, args or [], tmp_path / "listener.log")


@pytest.fixture
def listener_factory(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., ListenerProcess]]:
    """Start listeners on the test's Postgres database (or, with ``sqlite=True``, the embedded
    SQLite file in their data dir, created by ``preread listen`` itself); all are stopped afterwards."""
    started: list[ListenerProcess] = []

    def factory(*, start: bool = True, args: list[str] | None = None, sqlite: bool = False, **env: str) -> ListenerProcess:
        folder = tmp_path / f"l{len(started)}"
        url = f"sqlite:///{folder / 'data' / 'preread.db'}" if sqlite else pg_url
        lp = make_listener(folder, url, args=args, **env)
        lp.log_path.parent.mkdir(parents=True, exist_ok=True)
        started.append(lp)
        return lp.start() if start else lp

    yield factory
    for lp in started:
        lp.stop()
    from preread.schemas.database import engine_for

    engine_for.cache_clear()


def clone_series(template: Path, folder: Path, count: int, *, study_uid: str | None = None) -> list[Path]:
    """``count`` instances of one new series cloned from ``template`` with fresh UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    base = dcmread(template)
    study, series = study_uid or generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.SliceLocation = float(i)
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta."""
    from pydicom.filereader import read_preamble, _read_file_meta_info  # type: ignore[attr-defined]

    with path.open("rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return fp.read()


#: storescu's option that proposes a file's own transfer syntax (it converts to uncompressed otherwise).
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu_own_syntax(port: int, files: list[Path], **kwargs: Any) -> list[subprocess.CompletedProcess[str]]:
    """storescu once per transfer syntax, proposing the files' own one, so they are sent unconverted."""
    from pydicom import dcmread

    groups: dict[str, list[Path]] = {}
    for path in files:
        ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_TS_OPTION.get(ts, "-xe"), []).append(path)
    return [storescu(port, group, option, **kwargs) for option, group in sorted(groups.items())]


@pytest.fixture
def raw_send() -> Iterator[None]:
    """pynetdicom sends files given by path as their raw encoded bytes (no decode, no re-encode)."""
    from pynetdicom import _config

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


# --- raw DICOM Upper Layer, for peers that misbehave on purpose ---------------------------------------


def association_request(calling: str = "GOODSCU", called: str = "PREREAD", abstract_syntax: str | None = None,
                        transfer_syntax: str | None = None, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU (one presentation context, ID 1) encoded by pynetdicom."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    context = build_context(abstract_syntax or Verification, [transfer_syntax or ImplicitVRLittleEndian])
    context.context_id = 1
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def echo_request_pdata(message_id: int = 1, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU carrying a C-ECHO-RQ command (Implicit VR Little Endian)."""
    import struct

    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value

    uid = str(Verification).encode() + (b"\x00" if len(str(Verification)) % 2 else b"")
    body = (element(0x00000002, uid) + element(0x00000100, struct.pack("<H", 0x0030))
            + element(0x00000110, struct.pack("<H", message_id)) + element(0x00000800, struct.pack("<H", 0x0101)))
    command = element(0x00000000, struct.pack("<L", len(body))) + body
    item = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def read_pdu(sock: socket.socket, timeout: float = 30.0) -> tuple[int, bytes] | None:
    """(PDU type, PDU bytes after the header) of the next PDU, or ``None`` when the peer closed first."""
    import struct

    sock.settimeout(timeout)
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return None
        head += chunk
    pdu_type, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return pdu_type, body


def closed_by_peer(sock: socket.socket, timeout: float = 30.0) -> bool:
    """Whether the other end closes ``sock`` within ``timeout`` seconds (anything it sends first is read)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True
    return True


def rss_peak_since_reset(pid: int) -> int:
    """Peak resident set size (bytes) of ``pid`` since the last :func:`reset_rss_peak`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def rss_now(pid: int) -> int:
    """Resident set size (bytes) of ``pid`` now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def reset_rss_peak(pid: int) -> None:
    """Reset the kernel's peak RSS (VmHWM) of ``pid`` to its current RSS (Linux ``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")

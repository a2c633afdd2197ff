"""Hostile-peer benchmark: an attack mix against three DICOM receivers on loopback, in one run.

Each receiver in turn, ``preread listen``, Orthanc and dcmtk's ``storescp``
(out of the box: one association at a time), is attacked from 127.0.0.2 with

* idle sockets: 120 connections that never send a byte (reopened when the receiver closes one),
* connect-close churn: 20 connections a second, closed at once,
* declared-length bombs: 3 connections each sending a 10-byte PDU header that declares 1 GiB
  (reopened when closed),

while an allowed caller (``echoscu -aet GOODSCU``, 5 s timeouts) sends a C-ECHO every 0.5 s
from 127.0.0.1. Printed per receiver: the share of echoes answered, their p95 latency, and the
receiver's RSS growth (peak during the attack minus RSS before it; the peak is reset with
``/proc/<pid>/clear_refs``). Slow TLS handshakes are not in the mix (only preread is set up for
TLS here; ``tests/listener/test_hostile.py`` covers that case). Usage::

    .venv/bin/python bench/hostile.py [--echoes 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.procs import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
ECHOSCU = shutil.which("echoscu")
STORESCP = shutil.which("storescp")
ATTACKER = "127.0.0.2"
IDLE_SOCKETS = 120
CHURN_PER_SECOND = 20
BOMBS = 3
ECHO_TIMEOUT = 5


def rss(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def echo(port: int, called: str) -> tuple[bool, float]:
    """(answered, seconds) of one C-ECHO by the allowed caller."""
    started = time.perf_counter()
    t = str(ECHO_TIMEOUT)
    try:
        done = subprocess.run([ECHOSCU or "echoscu", "-aet", "GOODSCU", "-aec", called, "-to", t, "-ta", t, "-td", t,
                               "127.0.0.1", str(port)], capture_output=True, timeout=ECHO_TIMEOUT * 4)
        ok = done.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    return ok, time.perf_counter() - started


def wait_echo(port: int, called: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"receiver on port {port} exited with {proc.returncode}")
        if echo(port, called)[0]:
            return
        time.sleep(0.3)
    raise SystemExit(f"receiver on port {port} never answered C-ECHO")


def _connect(port: int) -> socket.socket | None:
    sock = socket.socket()
    try:
        sock.bind((ATTACKER, 0))
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        return None


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Attack:
    """The attack mix against ``port``, in background threads, until :meth:`stop`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=t, daemon=True) for t in (self._idle, self._churn, self._bombs)]

    def __enter__(self) -> Attack:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _hold(self, count: int, first_bytes: bytes) -> None:
        held: list[socket.socket | None] = [None] * count
        while not self._stop.is_set():
            for i, sock in enumerate(held):
                if sock is None or _closed(sock):
                    if sock is not None:
                        sock.close()
                    sock = held[i] = _connect(self.port)
                    if sock is not None and first_bytes:
                        try:
                            sock.send(first_bytes)
                        except OSError:
                            pass
            self._stop.wait(0.2)
        for sock in held:
            if sock is not None:
                sock.close()

    def _idle(self) -> None:
        self._hold(IDLE_SOCKETS, b"")

    def _bombs(self) -> None:
        self._hold(BOMBS, struct.pack(">BBL", 0x01, 0, 1 << 30) + b"\x00" * 4)

    def _churn(self) -> None:
        while not self._stop.is_set():
            sock = _connect(self.port)
            if sock is not None:
                sock.close()
            self._stop.wait(1 / CHURN_PER_SECOND)


def measure(name: str, start: Callable[[Path, int], subprocess.Popen[bytes]], called: str, echoes: int) -> dict[str, object]:
    """Start a receiver, attack it while echoing, stop it; its row of the table."""
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        port = free_port()
        proc = start(Path(tmp), port)
        try:
            wait_echo(port, called, proc)
            quiet = [echo(port, called) for _ in range(5)]  # the baseline: the same echo, no attack
            time.sleep(1.0)
            before = rss(proc.pid, "VmRSS")
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            results: list[tuple[bool, float]] = []
            with Attack(port):
                time.sleep(2.0)  # the attack is in place before the first echo
                for _ in range(echoes):
                    results.append(echo(port, called))
                    time.sleep(0.5)
            peak = rss(proc.pid, "VmHWM")
            alive = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    answered = [seconds for ok, seconds in results if ok]
    quiet_answered = [seconds for ok, seconds in quiet if ok]
    return {"name": name, "ok": len(answered), "n": len(results), "p95": p95(answered),
            "quiet": p95(quiet_answered), "growth": max(0, peak - before), "alive": alive}


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank), NaN for none."""
    return sorted(values)[max(0, int(round(0.95 * len(values))) - 1)] if values else float("nan")


def start_preread(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREREAD_")}
    env.update(PREREAD_DATA_DIR=str(tmp / "data"), PREREAD_HOST="127.0.0.1", PREREAD_ALLOWED_AES="GOODSCU",
               PREREAD_MIN_FREE_BYTES=str(16 * 1024 * 1024), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "preread.cli.main", "listen", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_orthanc(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    config = {
        "Name": "bench", "StorageDirectory": f"{tmp}/storage", "IndexDirectory": f"{tmp}/index", "DicomAet": "ORTHANC",
        "DicomPort": port, "HttpPort": free_port(), "RemoteAccessAllowed": False, "DicomCheckCalledAet": False,
        "Plugins": [], "HttpServerEnabled": False,
    }
    (tmp / "orthanc.json").write_text(json.dumps(config))
    return subprocess.Popen([ORTHANC or "Orthanc", str(tmp / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def start_storescp(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([STORESCP or "storescp", "-aet", "STORESCP", "-od", str(tmp), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echoes", type=int, default=20)
    args = parser.parse_args()
    if ECHOSCU is None:
        raise SystemExit("echoscu (dcmtk) is needed: apt-get install dcmtk")
    rows = [measure("preread listen", start_preread, "PREREAD", args.echoes)]
    if ORTHANC:
        rows.append(measure("Orthanc", start_orthanc, "ORTHANC", args.echoes))
    if STORESCP:
        rows.append(measure("dcmtk storescp", start_storescp, "STORESCP", args.echoes))
    base = rows[0]
    print(f"Attack from {ATTACKER}: {IDLE_SOCKETS} idle sockets, {CHURN_PER_SECOND}/s connect-close, {BOMBS} "
          f"declared-1-GiB PDUs; allowed caller echoes every 0.5 s ({args.echoes} echoes, {ECHO_TIMEOUT} s timeouts)\n")
    print("| receiver | C-ECHO answered | p95 latency | p95 without attack | p95 attack/quiet | p95 vs preread "
          "| RSS growth | RSS growth vs preread | alive after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        latency = f"{row['p95']:.3f} s" if row["ok"] else "-"
        ratio = f"{row['p95'] / row['quiet']:.2f}x" if row["ok"] else "-"
        versus = f"{row['p95'] / base['p95']:.2f}x" if row["ok"] and base["ok"] else "-"
        growth_ratio = (f"{row['growth'] / base['growth']:.2f}x" if base["growth"] else "-")
        print(f"| {row['name']} | {row['ok']}/{row['n']} ({100 * row['ok'] / row['n']:.0f} %) | {latency} | "
              f"{row['quiet']:.3f} s | {ratio} | {versus} | {row['growth'] / 2**20:.1f} MiB | {growth_ratio} | "
              f"{'yes' if row['alive'] else 'no'} |")


if __name__ == "__main__":
    main()

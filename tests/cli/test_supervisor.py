"""The one process supervisor: restarts children, gives up on one failing the same way, kills its group."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from preread.cli.supervisor import GaveUp, Supervisor, command_child


def poll_until_raises(supervisor: Supervisor, timeout: float = 60) -> GaveUp:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            supervisor.poll()
        except GaveUp as exc:
            return exc
        time.sleep(0.05)
    raise AssertionError("never gave up")


def test_gives_up_after_five_identical_failures(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = command_child("flaky", [sys.executable, "-c", "print('port 4242 is taken'); raise SystemExit(2)"], log)
    supervisor = Supervisor([child], backoff_s=0.1)
    supervisor.start()
    try:
        exc = poll_until_raises(supervisor)
    finally:
        supervisor.stop(5)
    assert exc.child == "flaky" and exc.times == 5 and exc.reason == "port 4242 is taken"
    assert log.read_text().count("port 4242 is taken") == 5


def test_different_failures_are_not_counted_together(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    script = (
        "import pathlib, sys\np = pathlib.Path(sys.argv[1])\nn = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1))\nprint(f'failure {n % 2}')\nraise SystemExit(1)"
    )
    child = command_child("alternating", [sys.executable, "-c", script, str(counter)], tmp_path / "c.log")
    supervisor = Supervisor([child], backoff_s=0.05)
    supervisor.start()
    try:
        deadline = time.monotonic() + 60
        while _count(counter) < 8 and time.monotonic() < deadline:
            supervisor.poll()  # never raises: no two failures in a row are the same
            time.sleep(0.02)
    finally:
        supervisor.stop(5)
    assert _count(counter) >= 8


def _count(path: Path) -> int:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else 0


def test_stop_kills_what_a_child_left_in_its_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    script = (
        "import subprocess, sys, signal, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "time.sleep(600)"
    )
    supervisor = Supervisor([command_child("parent", [sys.executable, "-c", script], tmp_path / "p.log")])
    supervisor.start()
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    supervisor.stop(10)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "a grandchild that ignores SIGTERM is killed with its group"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

"""``preread run``: a quiet console that says where things are, no orphan after any stop, no endless crash loop."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import base_env, free_port, preread_argv, wait_port, wait_until


def processes_of(data_dir: Path) -> list[int]:
    """Live (not zombie) processes started with this data dir in their environment: ours and our children's."""
    marker = f"PREREAD_DATA_DIR={data_dir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def env_for(tmp_path: Path, model: Path, port: int) -> dict[str, str]:
    return base_env(data_dir=tmp_path / "data", port=port, model=model, device="cpu", stable_after=1)


def wait_started(data_dir: Path, port: int) -> None:
    """Until the listener answers and both workers are ready."""
    wait_port(port, timeout=180)
    logs = data_dir / "logs"
    for name in ("render-worker", "infer-worker"):
        wait_until(lambda n=name: "ready." in _read(logs / f"{n}.log"), timeout=180, what=f"{name} ready")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def assert_no_orphan(data_dir: Path) -> None:
    """Every process of this run is gone (a few seconds for the last ones to be reaped)."""
    wait_until(lambda: processes_of(data_dir) == [], timeout=30, what=f"no process left, still {processes_of(data_dir)}")


@pytest.fixture
def run_env(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[dict[str, str], Path, int]]:
    port = free_port()
    data_dir = tmp_path / "data"
    yield env_for(tmp_path, tiny_model_dir, port), data_dir, port
    for pid in processes_of(data_dir):  # never leave anything behind, even when the test failed
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_everything_and_the_console_is_quiet(sig: signal.Signals, run_env: tuple[dict[str, str], Path, int]) -> None:
    env, data_dir, port = run_env
    proc = subprocess.Popen(preread_argv("run", "--no-live"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_started(data_dir, port)
        children = set(processes_of(data_dir)) - {proc.pid}
        assert len(children) >= 3, "listener, render worker (and its pool process), infer worker"
        run_log = data_dir / "logs" / "run.log"
        [listener] = [int(pid) for pid in re.findall(r"listener started \(pid (\d+)\)", _read(run_log))]
        os.kill(listener, sig)  # the same signal to a child: it ends cleanly and comes back
        wait_until(lambda: "listener stopped" in _read(data_dir / "logs" / "listener.log"), 180, what="listener stopped")
        wait_until(lambda: len(re.findall(r"listener started", _read(run_log))) == 2, 180, what="listener restarted")
        wait_port(port, timeout=120)
        proc.send_signal(sig)
        console, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, console
    assert_no_orphan(data_dir)
    lines = console.splitlines()
    assert f"data dir: {data_dir}" in lines[0]
    assert any(f"logs: {data_dir / 'logs'}" in line for line in lines[:4])
    assert "database: sqlite:///" in console
    # Celery's banner and warnings belong in the workers' log files, not on the console
    banner = "-------------- [queues]"
    assert banner not in console and "ready." not in console and "WARNING" not in console, console
    assert banner in _read(data_dir / "logs" / "render-worker.log")


def test_closing_the_terminal_leaves_no_orphan(run_env: tuple[dict[str, str], Path, int]) -> None:
    env, data_dir, port = run_env
    pid, master = pty.fork()
    if pid == 0:  # the child: `preread run` on a terminal, as a user starts it
        argv = preread_argv("run")
        os.execve(argv[0], argv, env)
    screen = b""
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # keep reading the terminal so the live view never blocks
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
            if _listening(port) and "ready." in _read(data_dir / "logs" / "infer-worker.log"):
                break
        assert len(processes_of(data_dir)) >= 4, screen[-2000:]
        os.close(master)  # the terminal window closes: the kernel hangs up its session
        master = -1
        _, status = _waitpid(pid, timeout=120)
        assert status is not None, "preread run ended when its terminal closed"
        assert_no_orphan(data_dir)
    finally:
        if master >= 0:
            os.close(master)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert b"data dir:" in screen


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _waitpid(pid: int, timeout: float) -> tuple[int, int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return done, status
        time.sleep(0.2)
    return pid, None


def test_gives_up_on_a_child_failing_the_same_way(run_env: tuple[dict[str, str], Path, int]) -> None:
    env, data_dir, _ = run_env
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {**env, "PREREAD_PORT": str(port)}
    try:
        result = subprocess.run(preread_argv("run", "--no-live"), env=env, capture_output=True, text=True, timeout=400)
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "listener failed 5 times in a row" in last and f"port {port}" in last and "PREREAD_PORT" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert_no_orphan(data_dir)
    listener_log = _read(data_dir / "logs" / "listener.log")
    assert listener_log.count(f"port {port}") == 5, "tried five times, not forever"

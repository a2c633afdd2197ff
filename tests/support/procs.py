"""Helpers for tests that run real processes: our own commands, Redis, Postgres, dcmtk."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the peer may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Wait until something accepts TCP connections on loopback ``port``."""

    def _open() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(_open, timeout, what=f"port {port}")


class Proc:
    """A child process of ours, its output in a log file, killed at the end of the test."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> None:
        self.argv, self.env, self.log_path, self.cwd = argv, env, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     start_new_session=True)
        fh.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker has children)."""
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            assert self.proc is not None
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def processes() -> Iterator[list[Proc]]:
    """Collects started processes and kills every one of them afterwards."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.kill()


def preread_argv(*args: str) -> list[str]:
    """Our console command, run with this test's interpreter."""
    return [sys.executable, "-m", "preread.cli.main", *args]


def base_env(**settings: object) -> dict[str, str]:
    """The test process's environment plus ``PREREAD_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREREAD_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key, value in settings.items():
        if value is not None:
            env[f"PREREAD_{key.upper()}"] = str(value)
    return env


class RedisServer:
    """A private, real redis-server on a free loopback port (no persistence, like production's cache)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 20)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Kill -9 and start again: everything queued in it is gone."""
        self.kill()
        self.start()


class PostgresServer:
    """A private, real PostgreSQL cluster on a free port, owned by the ``postgres`` user.

    Its folder is a fresh one under the system temp dir, because the server
    (not root) must be able to reach it.
    """

    def __init__(self) -> None:
        import tempfile

        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="preread-pg-"))
        self.workdir.chmod(0o755)
        self.bindir = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        cmd = list(argv)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def init(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.workdir / "data"), "-A", "trust", "-U", "postgres")
        return self

    def start(self) -> PostgresServer:
        self._as_postgres(
            str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "data"), "-w", "-l", str(self.workdir / "log"),
            "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off", "start",
        )
        return self

    def restart(self) -> None:
        self._as_postgres(
            str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "data"), "-w", "-m", "immediate", "restart",
            "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off",
        )

    def halt(self) -> None:
        """Stop at once (connections drop mid-transaction); ``start`` brings it back."""
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "data"), "-w", "-m", "immediate", "stop")

    def stop(self) -> None:
        try:
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def storescu(port: int, files: list[Path], aet: str = "STORESCU", aec: str = "PREREAD", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk's storescu over one association."""
    exe = shutil.which("storescu")
    assert exe, "dcmtk's storescu is not installed"
    return subprocess.run(
        [exe, "-aet", aet, "-aec", aec, "-nh", "+sd", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )

"""``preread run``: listener, coordinator and workers for one machine, in one command."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from preread.schemas.database import upgrade
from preread.schemas.settings import get_settings

log = logging.getLogger(__name__)

#: A child that dies is restarted, but not more often than this (seconds).
RESTART_BACKOFF_S = 2.0


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if ``preread run`` itself dies (Linux), so no worker is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Child:
    """A supervised child process: started again if it dies while we run."""

    def __init__(self, name: str, argv: list[str], log_file: Path | None = None) -> None:
        self.name, self.argv, self.log_file = name, argv, log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restarts = 0

    def start(self) -> None:
        """Start the child; its output goes to its log file, or to ours when it has none."""
        if self.log_file is None:
            self.proc = subprocess.Popen(self.argv, preexec_fn=_die_with_parent)
        else:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as out:
                self.proc = subprocess.Popen(
                    self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
                )
        self.started_at = time.monotonic()

    def check(self) -> None:
        """Restart the child if it exited."""
        if self.proc is not None and self.proc.poll() is not None:
            if time.monotonic() - self.started_at < RESTART_BACKOFF_S:
                return
            log.warning("%s exited with %s; restarting", self.name, self.proc.returncode)
            self.restarts += 1
            self.start()

    def terminate(self) -> None:
        """Ask the child to stop (a warm shutdown: running tasks finish)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        """Wait for the child to stop; kill it after ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run(
    render_workers: Annotated[int, typer.Option(help="Render processes.")] = 1,
    infer_threads: Annotated[int, typer.Option(help="Threads submitting to the one loaded model.")] = 2,
    listen: Annotated[bool, typer.Option(help="Run the DICOM listener too.")] = True,
    live: Annotated[bool | None, typer.Option(help="Live status display (default: when on a terminal).")] = None,
) -> None:
    """Run the whole pipeline on this machine (embedded defaults: SQLite and a server-less queue)."""
    from rich.console import Console
    from rich.live import Live

    from preread.cli.status import render_status
    from preread.worker.pipeline.celery_app import app
    from preread.worker.pipeline.coordinator import coordinate_forever
    from preread.worker.pipeline.status import snapshot

    settings = get_settings()
    upgrade(settings.effective_database_url)
    console = Console(stderr=True)
    show_live = console.is_terminal if live is None else live
    # With the live view on the terminal, the children's own output goes to files beside the data.
    logs = settings.data_dir / "logs" if show_live else None
    exe = [sys.executable, "-m", "preread.cli.main"]
    roles = [
        ("listener", ["listen"]),
        ("render-worker", ["worker", "--queues", "render", "--concurrency", str(render_workers)]),
        ("infer-worker", ["worker", "--queues", "infer,export", "--concurrency", str(infer_threads)]),
        ("api", ["api"]),  # the reading queue's API and dashboard
    ]
    children = [
        Child(name, exe + args, logs / f"{name}.log" if logs else None)
        for name, args in roles
        if listen or name != "listener"
    ]
    from preread.api.bootstrap import dashboard_banner

    console.print(dashboard_banner(settings), highlight=False, soft_wrap=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    for child in children:
        child.start()
    coordinator = threading.Thread(target=coordinate_forever, args=(settings, app, stop), name="coordinator", daemon=True)
    coordinator.start()
    try:
        if show_live:
            console.print(
                f"preread run: DICOM on {settings.ae_title}@{settings.host}:{settings.port}, "
                f"data in {settings.data_dir.resolve()}, logs in {logs}; Ctrl-C stops."
            )
            with Live(render_status(snapshot(settings, app)), console=console, refresh_per_second=1) as view:
                while not stop.wait(1.0):
                    for child in children:
                        child.check()
                    view.update(render_status(snapshot(settings, app)))
        else:
            ticks = 0
            while not stop.wait(1.0):
                for child in children:
                    child.check()
                ticks += 1
                if ticks % 30 == 0:
                    s = snapshot(settings)
                    log.info("studies: %s; outbox pending: %d", s.states, s.outbox_pending)
    finally:
        stop.set()
        for child in children:
            child.terminate()
        for child in reversed(children):
            child.stop()
        coordinator.join(timeout=5)


def coordinate() -> None:
    """Run the coordinator alone: stability monitor, outbox dispatcher, reconciler."""
    from preread.worker.pipeline.celery_app import app
    from preread.worker.pipeline.coordinator import coordinate_forever

    settings = get_settings()
    upgrade(settings.effective_database_url)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    coordinate_forever(settings, app, stop)

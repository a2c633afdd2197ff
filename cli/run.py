"""``preread run``: listener, coordinator and workers for one machine, in one command.

The children (listener, render worker, infer worker) run under the one process supervisor
(:mod:`preread.cli.supervisor`): each writes to its own log file under ``DATA_DIR/logs``, so Celery's
banners and warnings stay out of the console, which shows where data, database and logs are, then
the live status (or a line every 30 s when not on a terminal). SIGTERM, SIGINT and SIGHUP (the
terminal closing) stop everything; a child that fails the same way five times in a row ends the run
with its reason and exit code 2.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger(__name__)

#: Seconds between two status lines when the live view is off.
STATUS_EVERY_S = 30
#: Signals that stop ``preread run`` (SIGHUP: its terminal was closed).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def describe_sources(settings: Any) -> list[str]:
    """Where a command's data and database are, for its first lines (password masked)."""
    from preread.cli.errors import mask_url

    return [
        f"data dir: {settings.data_dir.resolve()} (PREREAD_DATA_DIR)",
        f"database: {mask_url(settings.effective_database_url)} (PREREAD_DATABASE_URL)",
    ]


def preread_command() -> list[str]:
    """How children run ``preread``: the console script beside this interpreter when there is one.

    A Celery worker restarted by SIGHUP re-executes its own command line; ``preread worker`` works
    from anywhere, a module path may not.
    """
    script = Path(sys.executable).with_name("preread")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "preread.cli.main"]


def _log_to_file(path: Path) -> None:
    """This process's own log lines (coordinator, supervisor) go to ``path``, not the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)


def _say(console: Any, text: str) -> None:
    """One console line; a closed terminal (SIGHUP) must not stop the shutdown."""
    try:
        console.print(text, highlight=False, soft_wrap=True)
    except OSError:
        pass


def run(
    render_workers: Annotated[int, typer.Option(help="Render processes.")] = 1,
    infer_threads: Annotated[int, typer.Option(help="Threads submitting to the one loaded model.")] = 2,
    listen: Annotated[bool, typer.Option(help="Run the DICOM listener too.")] = True,
    live: Annotated[bool | None, typer.Option(help="Live status display (default: when on a terminal).")] = None,
) -> None:
    """Run the whole pipeline on this machine (embedded defaults: SQLite and a server-less queue)."""
    from rich.console import Console

    from preread.cli.supervisor import Supervisor, command_child
    from preread.schemas.database import upgrade
    from preread.schemas.settings import get_settings

    settings = get_settings()
    console = Console(stderr=True)
    logs = settings.data_dir.resolve() / "logs"
    upgrade(settings.effective_database_url)
    _log_to_file(logs / "run.log")
    show_live = console.is_terminal if live is None else live
    for line in describe_sources(settings):
        _say(console, f"preread run: {line}")
    _say(console, f"preread run: logs: {logs}")
    if listen:
        _say(console, f"preread run: DICOM listener: {settings.ae_title}@{settings.host}:{settings.port}")

    exe = preread_command()
    roles = [
        ("listener", ["listen"]),
        ("render-worker", ["worker", "--queues", "render", "--concurrency", str(render_workers)]),
        ("infer-worker", ["worker", "--queues", "infer,export", "--concurrency", str(infer_threads)]),
        ("api", ["api"]),  # the reading queue's API and dashboard
    ]
    supervisor = Supervisor(
        [command_child(name, exe + args, logs / f"{name}.log") for name, args in roles if listen or name != "listener"]
    )
    from preread.api.bootstrap import dashboard_banner

    console.print(dashboard_banner(settings), highlight=False, soft_wrap=True)
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())

    from preread.worker.pipeline.celery_app import app
    from preread.worker.pipeline.coordinator import coordinate_forever

    supervisor.start()
    coordinator = threading.Thread(target=coordinate_forever, args=(settings, app, stop), name="coordinator", daemon=True)
    coordinator.start()
    _say(console, "preread run: started; Ctrl-C stops")
    try:
        if show_live:
            _run_live(console, settings, app, supervisor, stop)
        else:
            _run_plain(console, settings, supervisor, stop)
    finally:
        stop.set()
        supervisor.stop()
        coordinator.join(timeout=5)
        _say(console, "preread run: stopped")


def _run_live(console: Any, settings: Any, app: Any, supervisor: Any, stop: threading.Event) -> None:
    """The live status table until ``stop``."""
    from rich.live import Live

    from preread.cli.status import render_status
    from preread.worker.pipeline.status import snapshot

    try:
        with Live(render_status(snapshot(settings, app)), console=console, refresh_per_second=1) as view:
            while not stop.wait(1.0):
                supervisor.poll()
                view.update(render_status(snapshot(settings, app)))
    except OSError:  # the terminal went away (SIGHUP follows): stop quietly
        stop.set()


def _run_plain(console: Any, settings: Any, supervisor: Any, stop: threading.Event) -> None:
    """A status line every :data:`STATUS_EVERY_S` seconds until ``stop``."""
    from preread.worker.pipeline.status import snapshot

    ticks = 0
    while not stop.wait(1.0):
        supervisor.poll()
        ticks += 1
        if ticks % STATUS_EVERY_S == 0:
            s = snapshot(settings)
            _say(console, f"preread run: studies {s.states}; outbox pending {s.outbox_pending}")


def coordinate() -> None:
    """Run the coordinator alone: stability monitor, outbox dispatcher, reconciler."""
    from preread.schemas.database import upgrade
    from preread.schemas.settings import get_settings
    from preread.worker.pipeline.celery_app import app
    from preread.worker.pipeline.coordinator import coordinate_forever

    settings = get_settings()
    upgrade(settings.effective_database_url)
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    coordinate_forever(settings, app, stop)

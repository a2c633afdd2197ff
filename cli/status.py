"""``preread status``: studies per state, queue depths, the last failures."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from preread.schemas.settings import get_settings
from preread.worker.pipeline.status import PipelineStatus, snapshot


def render_status(status: PipelineStatus) -> Group:
    """Rich tables for a status snapshot (shared with ``preread run``'s live view)."""
    states = Table(title="Studies", show_edge=False)
    for name in status.states:
        states.add_column(name, justify="right")
    states.add_row(*(str(v) for v in status.states.values()))
    queues = Table(title="Queues", show_edge=False)
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    for name, depth in status.queues.items():
        queues.add_row(name, "?" if depth is None else str(depth))
    queues.add_row("outbox", str(status.outbox_pending))
    failures = Table(title="Last failures", show_edge=False)
    failures.add_column("when (UTC)")
    failures.add_column("study")
    failures.add_column("reason")
    for f in status.failures:
        failures.add_row(f.at.strftime("%Y-%m-%d %H:%M:%S"), f.study_uid, f.error)
    return Group(states, queues, failures)


def status() -> None:
    """Print the pipeline's state from the database and the broker."""
    from rich.console import Console

    from preread.schemas.database import upgrade
    from preread.worker.pipeline.celery_app import app

    settings = get_settings()
    upgrade(settings.effective_database_url)
    Console().print(render_status(snapshot(settings, app)))
    from preread.ingest.storage.retention import status_lines
    from preread.worker.pipeline.gpus import status_lines as worker_lines

    Console().print("\n".join(worker_lines(settings.effective_database_url) + status_lines(settings)))

"""``preread status``: studies per state, queue depths, the last failures, delivery problems per destination."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the commands that use them: `preread --help` stays fast
    from rich.console import Group, RenderableType
    from rich.table import Table

    from preread.worker.pipeline.status import PipelineStatus


def render_status(status: PipelineStatus) -> Group:
    """Rich tables for a status snapshot (shared with ``preread run``'s live view)."""
    from rich.console import Group, RenderableType
    from rich.table import Table
    from rich.text import Text

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
    parts: list[RenderableType] = [states]
    for state, why in status.waiting.items():
        parts.append(Text(f"{status.states.get(state, 0)} {state} studies wait: {why}", style="yellow"))
    parts += [queues, _processes(status)]
    parts += [Text(line, style="bold red") for line in status.warnings]
    parts.append(failures)
    if status.export_failures:
        exports = Table(title="Delivery problems (drafts stay DRAFTED; the coordinator retries, `preread export` sends again)",
                        show_edge=False)
        for column in ("destination", "pending", "failed", "last error", "when (UTC)"):
            exports.add_column(column)
        for t in status.export_failures:
            when = t.at.strftime("%Y-%m-%d %H:%M:%S") if t.at is not None else ""
            exports.add_row(t.destination, str(t.pending), str(t.failed), t.last_error, when)
        parts.append(exports)
    return Group(*parts)


def _processes(status: PipelineStatus) -> Table:
    """Processes seen in the last minute, with their readiness and why not."""
    from rich.table import Table

    table = Table(title="Processes (seen in the last 60 s)", show_edge=False)
    for column in ("role", "queues", "host", "pid", "state", "reason"):
        table.add_column(column)
    for p in status.processes:
        table.add_row(p.role, ",".join(p.queues), p.host, str(p.pid), p.state, p.reason or "")
    return table


def status() -> None:
    """Print the pipeline's state from the database and the broker (never creates or migrates anything)."""
    from rich.console import Console

    from preread.cli.db import require_database
    from preread.cli.run import describe_sources
    from preread.schemas.settings import get_settings

    settings = get_settings()
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped or logged: whole lines, that grep finds
    for line in describe_sources(settings):
        console.print(line, highlight=False, soft_wrap=True)
    require_database(settings.effective_database_url)
    from preread.worker.pipeline.celery_app import app
    from preread.worker.pipeline.status import snapshot

    console.print(render_status(snapshot(settings, app)))
    from preread.cli.sweep import status_lines as sweep_status_lines

    for line in sweep_status_lines(settings):  # archive sweeps (cli/sweep.py)
        console.print(line, highlight=False)
    from preread.ingest.storage.retention import status_lines as disk_lines
    from preread.worker.pipeline.gpus import status_lines as worker_lines

    for line in worker_lines(settings.effective_database_url) + disk_lines(settings):  # workers' devices; disk, cleanup
        console.print(line, highlight=False)

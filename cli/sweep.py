"""``preread sweep``: draft a source's past studies; the coordinator does the work, this creates and follows it."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from preread.schemas.settings import Settings


def _settings() -> Settings:
    """The settings, imported when a command runs (``preread --help`` loads no settings machinery)."""
    from preread.schemas.settings import get_settings

    return get_settings()


sweep_app = typer.Typer(no_args_is_help=True, help="Archive sweeps: draft a PACS's, DICOMweb server's or folder's past studies.")

#: States after which a sweep no longer changes by itself.
ENDED = ("done", "cancelled", "failed")


def _fail(message: str) -> None:
    """An operator error: one line, exit code 2."""
    Console(stderr=True, soft_wrap=True).print(f"error: {message}", highlight=False, markup=False)
    raise typer.Exit(2)


def _day(value: str, option: str) -> date:
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        _fail(f"{option} {value!r}: expected a date as YYYY-MM-DD")
        raise


def _url() -> str:
    from preread.schemas.database import upgrade

    url = _settings().effective_database_url
    upgrade(url)
    return url


def sweep_lines(url: str) -> list[str]:
    """One line per open or recently ended sweep, for ``preread status`` and ``sweep list``."""
    from preread.ingest.sweep import ledger
    from preread.schemas.database import session_scope

    lines = []
    with session_scope(url) as session:
        for s in ledger.open_sweeps_summary(session):
            c = ledger.counts(session, s.id)
            extra = f" ({s.note})" if s.note else ""
            err = f" error: {s.error}" if s.error else ""
            lines.append(
                f"sweep {s.id} {s.source} {s.date_from}..{s.date_to} {s.state}{extra}: found {c.found}, "
                f"drafted {c.drafted}, skipped {c.skipped}, waiting {c.waiting}, in pipeline {c.in_pipeline}, "
                f"incomplete {c.incomplete}, failed {c.failed}{err}"
            )
    return lines


def status_lines(settings: object | None = None) -> list[str]:
    """The sweep lines of ``preread status`` (empty when there are no sweeps)."""
    settings = settings or _settings()
    return sweep_lines(settings.effective_database_url)  # type: ignore[attr-defined]


def _dry_run(source_name: str, start: date, end: date, modalities: list[str], force: bool) -> None:
    from preread.ingest.sweep import ledger
    from preread.ingest.sweep.dimse import SourceUnavailable
    from preread.ingest.sweep.runner import clients, prompt_version
    from preread.ingest.sweep.sources import SourceError, find_source, load_sources
    from preread.schemas.database import session_scope

    settings = _settings()
    try:
        source = find_source(load_sources(settings), source_name)
    except SourceError as exc:
        _fail(str(exc))
        raise
    query, _ = clients(source, settings, None) if source.kind == "dicom" else clients(source, settings, _no_store())
    typer.echo(f"would retrieve from {source_name} (study date, Study Instance UID, modalities, instances):")
    total = skipped = 0
    try:
        day = start
        while day <= end:
            studies = query.find_studies(day, modalities)
            with session_scope(_url()) as session:
                drafted = set() if force else ledger.current_report_uids(
                    session, [s.study_uid for s in studies], settings.model, prompt_version(settings))
            for s in studies:
                if s.study_uid in drafted:
                    skipped += 1
                    continue
                count = s.instances if s.instances is not None else len(query.count_instances(s.study_uid))
                typer.echo(f"{s.study_date} {s.study_uid} {s.modalities or '-'} {count}")
                total += 1
            day += timedelta(days=1)
    except (SourceUnavailable, RuntimeError) as exc:
        _fail(str(exc))
    typer.echo(f"{total} studies would be retrieved; {skipped} already drafted by this model and prompt version.")


def _no_store():  # type: ignore[no-untyped-def]
    """An ingest context for the query clients of a dry run (nothing is stored)."""
    from preread.ingest.sweep.store import ingest_context

    return ingest_context(_settings())


def _follow(url: str, sweep_id: int) -> str:
    """Show the sweep's progress until it ends; returns its final state."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from preread.ingest.sweep import ledger
    from preread.schemas.database import session_scope
    from preread.schemas.tables import Sweep

    console = Console(stderr=True)
    with Progress(TextColumn("sweep {task.fields[id]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("queued", total=None, id=sweep_id)
        last = ""
        while True:
            with session_scope(url) as session:
                sweep = session.get(Sweep, sweep_id)
                assert sweep is not None
                c = ledger.counts(session, sweep_id)
                state, note, error = sweep.state, sweep.note, sweep.error
            querying = sweep.next_day is not None and sweep.next_day <= sweep.date_to
            desc = f"{state}: drafted {c.drafted}, skipped {c.skipped}, in pipeline {c.in_pipeline}, failed {c.failed}"
            if note:
                desc += f" ({note})"
            progress.update(task, total=None if querying else max(c.found, 1), completed=c.finished, description=desc)
            if not console.is_terminal and desc != last:
                console.print(f"sweep {sweep_id} {desc}", highlight=False)
            last = desc
            if state in ENDED:
                if error:
                    console.print(f"sweep {sweep_id}: {error}", highlight=False)
                return str(state)
            time.sleep(1.0)


@sweep_app.command("run")
def run(
    source: Annotated[str, typer.Argument(help="Name of a [[sources]] entry in the settings file.")],
    date_from: Annotated[str, typer.Option("--from", help="First study date, YYYY-MM-DD.")],
    date_to: Annotated[str, typer.Option("--to", help="Last study date, YYYY-MM-DD.")],
    modality: Annotated[str | None, typer.Option(help="Only these modalities, e.g. CR,DX,CT.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be retrieved; change nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Draft again studies that already have a current report.")] = False,
    ignore_window: Annotated[bool, typer.Option("--ignore-window", help="Work outside PREREAD_SWEEP_WINDOW too.")] = False,
    detach: Annotated[bool, typer.Option(help="Return at once; the coordinator runs the sweep.")] = False,
) -> None:
    """Create a sweep of SOURCE's studies dated --from..--to and follow it (the coordinator runs it)."""
    from preread.ingest.sweep import ledger
    from preread.ingest.sweep.query import modality_list
    from preread.ingest.sweep.sources import SourceError, find_source, load_sources
    from preread.schemas.database import session_scope

    start, end = _day(date_from, "--from"), _day(date_to, "--to")
    if end < start:
        _fail(f"--to {end} is before --from {start}")
    try:
        find_source(load_sources(_settings()), source)
    except SourceError as exc:
        _fail(str(exc))
    modalities = modality_list(modality)
    if dry_run:
        _dry_run(source, start, end, modalities, force)
        return
    url = _url()
    with session_scope(url) as session:
        sweep_id = ledger.create_sweep(session, source, start, end, modalities, force=force, ignore_window=ignore_window)
    assert sweep_id is not None
    Console(stderr=True).print(f"sweep {sweep_id} created: {source} {start}..{end}; the coordinator runs it "
                               "(preread run or preread coordinate)", highlight=False)
    if detach:
        typer.echo(sweep_id)
        return
    state = _follow(url, sweep_id)
    if state != "done":
        raise typer.Exit(1)


@sweep_app.command("list")
def list_() -> None:
    """Open sweeps and those ended in the last day."""
    lines = sweep_lines(_url())
    for line in lines or ["no sweeps"]:
        typer.echo(line)


@sweep_app.command("status")
def status(sweep_id: Annotated[int, typer.Argument(help="Sweep id.")]) -> None:
    """One sweep: its counts and the studies that did not go through cleanly."""
    from sqlalchemy import select

    from preread.ingest.sweep import ledger
    from preread.schemas.database import session_scope
    from preread.schemas.tables import Sweep, SweepStudy

    with session_scope(_url()) as session:
        sweep = session.get(Sweep, sweep_id)
        if sweep is None:
            _fail(f"no sweep {sweep_id} (preread sweep list shows them)")
        assert sweep is not None
        c = ledger.counts(session, sweep_id)
        typer.echo(f"sweep {sweep.id}: {sweep.source} {sweep.date_from}..{sweep.date_to} "
                   f"modalities {sweep.modalities or 'all'} {sweep.state}" + (f" ({sweep.note})" if sweep.note else ""))
        typer.echo(" ".join(f"{k} {v}" for k, v in c.as_dict().items()))
        if sweep.error:
            typer.echo(f"error: {sweep.error}")
        rows = session.scalars(select(SweepStudy).where(SweepStudy.sweep_id == sweep_id, SweepStudy.error.is_not(None),
                                                       SweepStudy.state != "skipped").order_by(SweepStudy.id))
        for row in rows:
            typer.echo(f"  {row.study_instance_uid} {row.state} expected {row.expected} received {row.received} "
                       f"attempts {row.attempts}: {row.error}")


def _change(sweep_id: int, to: str, allowed: tuple[str, ...], verb: str) -> None:
    from preread.ingest.sweep import ledger
    from preread.schemas.database import session_scope
    from preread.schemas.tables import Sweep, SweepState

    with session_scope(_url()) as session:
        sweep = session.get(Sweep, sweep_id)
        if sweep is None:
            _fail(f"no sweep {sweep_id} (preread sweep list shows them)")
        assert sweep is not None
        if not ledger.change_state(session, sweep_id, SweepState(to), [SweepState(a) for a in allowed]):
            _fail(f"sweep {sweep_id} is {sweep.state}; only a sweep that is {' or '.join(allowed)} can be {verb}")
    typer.echo(f"sweep {sweep_id} {verb}")


@sweep_app.command("pause")
def pause(sweep_id: Annotated[int, typer.Argument(help="Sweep id.")]) -> None:
    """Stop retrieving; its studies stay held until it is resumed or cancelled."""
    _change(sweep_id, "paused", ("queued", "running"), "paused")


@sweep_app.command("resume")
def resume(sweep_id: Annotated[int, typer.Argument(help="Sweep id.")]) -> None:
    """Go on with a paused or failed sweep (after fixing what its error names)."""
    _change(sweep_id, "queued", ("paused", "failed", "running"), "resumed")


@sweep_app.command("cancel")
def cancel(sweep_id: Annotated[int, typer.Argument(help="Sweep id.")]) -> None:
    """End the sweep; studies it had not released go on through the stability monitor."""
    _change(sweep_id, "cancelled", ("queued", "running", "paused", "failed"), "cancelled")

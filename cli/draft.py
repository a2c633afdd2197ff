"""``preread draft``: DICOM files on disk to a stored draft report, in one process."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # the stack is imported when the command runs: `preread --help` stays fast
    from preread.ingest.assembly.discover import FoundStudy
    from preread.schemas.settings import Settings

log = logging.getLogger(__name__)


def _index_study(settings: Settings, found: FoundStudy) -> int:
    """Record a study's files in the database (idempotent) and mark it STABLE for (re)drafting."""
    from preread.ingest.assembly.catalog import record_instance
    from preread.schemas.database import session_scope
    from preread.schemas.tables import StudyState
    from preread.worker.pipeline.stages import set_state

    with session_scope(settings.effective_database_url) as session:
        study_id = 0
        for inst in found.instances:
            study_id, _ = record_instance(
                session,
                inst.header,
                inst.path.resolve(),
                inst.size_bytes,
                transfer_syntax_uid=inst.transfer_syntax_uid,
                source="draft",
            )
        # Complete as found on disk: (re-)draft it now, whatever it was before.
        set_state(session, study_id, StudyState.STABLE)
    return study_id


def _summary(settings: Settings, study_id: int, study_uid: str) -> dict[str, Any]:
    """The stored draft of a study, as printed by the command."""
    from sqlalchemy import select

    from preread.schemas.database import session_scope
    from preread.schemas.tables import Image
    from preread.worker.pipeline.stages import current_report

    with session_scope(settings.effective_database_url) as session:
        report = current_report(session, study_id)
        assert report is not None
        images = session.execute(
            select(Image.path, Image.width, Image.height, Image.window).where(Image.study_id == study_id).order_by(Image.ordinal)
        ).all()
        return {
            "study_instance_uid": study_uid,
            "report_id": report.id,
            "parse_status": report.parse_status,
            "draft": report.draft_text,
            "structured": report.structured,
            "raw_output": report.raw_output,
            "thinking": report.thinking,
            "model_id": report.model_id,
            "prompt_version": report.prompt_version,
            "images": [{"path": p, "width": w, "height": h, "window": win} for p, w, h, win in images],
        }


def draft(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).", exists=True)],
    model: Annotated[str | None, typer.Option(help="Hub id or local folder; default PREREAD_MODEL.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the drafts as JSON.")] = False,
) -> None:
    """Draft a pre-read for every study found under PATHS and store it in the database."""
    from rich.console import Console

    from preread.cli.errors import use_settings
    from preread.ingest.assembly.discover import discover
    from preread.schemas.database import session_scope, upgrade
    from preread.schemas.settings import get_settings
    from preread.schemas.tables import StudyState
    from preread.worker.pipeline.stages import BadInput, infer_step, render_step, set_state

    settings = get_settings()
    if model:
        settings = settings.model_copy(update={"model": model})
    use_settings(settings)  # messages name the model given here
    err = Console(stderr=True)
    upgrade(settings.effective_database_url)
    studies, skipped = discover(paths)
    for item in skipped:
        err.print(f"[yellow]skipped[/yellow] {item.path}: {item.reason}", soft_wrap=True, highlight=False)
    if not studies:
        err.print("[red]no readable DICOM study found[/red]")
        raise typer.Exit(2)
    from preread.worker.inference.engine import Engine  # imports torch: only once there is work

    engine = Engine.from_settings(settings)
    results, failures = [], 0
    for found in studies:
        study_id = _index_study(settings, found)
        try:
            render_step(settings, study_id, handoff=None)
            infer_step(settings, study_id, engine)
        except BadInput as exc:
            failures += 1
            with session_scope(settings.effective_database_url) as session:
                set_state(session, study_id, StudyState.FAILED, error=str(exc))
            err.print(f"[red]study {found.study_uid} failed[/red]: {exc}")
            continue
        results.append(_summary(settings, study_id, found.study_uid))
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        out = Console()
        for res in results:
            out.rule(f"study {res['study_instance_uid']}  ({len(res['images'])} images, parse: {res['parse_status']})")
            out.print(res["draft"] if res["draft"] else f"[dim]unparsed model output:[/dim] {res['raw_output']!r}")
    if failures and not results:
        raise typer.Exit(1)

"""``preread draft``: DICOM files on disk to a stored draft report, in one process."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:  # the stack is imported when the command runs: `preread --help` stays fast
    from preread.ingest.assembly.discover import FoundStudy
    from preread.schemas.settings import Settings
    from preread.worker.inference.engine import ProbeResult

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


def urgency_reason(study: str | None, report: str | None, probes: list[dict[str, Any]], settings: Settings) -> str:
    """Why the study has the urgency it has, in words; says so when it differs from the report's.

    The study takes the higher of the report's urgency and the probes' (the top probe score against
    PREREAD_PRIORITY_THRESHOLD and PREREAD_STAT_THRESHOLD).
    """
    from preread.schemas.findings import Urgency
    from preread.worker.inference.engine import urgency_from_probes

    top = max(probes, key=lambda p: p["score"], default=None)
    thresholds = (
        f"PREREAD_PRIORITY_THRESHOLD={settings.priority_threshold:g}, PREREAD_STAT_THRESHOLD={settings.stat_threshold:g}"
    )
    if top is None:
        from_probes = Urgency.ROUTINE
        probe_words = "no probe scores"
    else:
        stored = cast(list["ProbeResult"], [SimpleNamespace(score=p["score"]) for p in probes])  # it reads .score only
        from_probes = urgency_from_probes(stored, settings.priority_threshold, settings.stat_threshold)
        probe_words = f"the top probe, {top['condition']}, scored {top['score']:.2f} ({thresholds})"
    if report is None:
        return f"{study}: from the probes, the report has no urgency (unparsed); {probe_words}"
    if study == report:
        if from_probes == Urgency(report):
            return f"{study}: the report's urgency, and the probes agree: {probe_words}"
        return f"{study}: the report's urgency, higher than the probes': {probe_words}"
    return f"{study}, not the report's {report}: raised by the probes: {probe_words}"


def _summary(settings: Settings, study_id: int, study_uid: str) -> dict[str, Any]:
    """The stored draft of a study, as printed by the command: with probe scores, urgency and what was left out."""
    from sqlalchemy import select

    from preread.ingest.render.manifest import MANIFEST_NAME, read_manifest
    from preread.schemas.database import session_scope
    from preread.schemas.tables import Image, ProbeScore, Study
    from preread.worker.pipeline.stages import current_report

    with session_scope(settings.effective_database_url) as session:
        report = current_report(session, study_id)
        assert report is not None
        images = session.execute(
            select(Image.path, Image.width, Image.height, Image.window).where(Image.study_id == study_id).order_by(Image.ordinal)
        ).all()
        probes = [
            {"condition": c, "question": q, "score": round(float(sc), 4)}
            for c, q, sc in session.execute(
                select(ProbeScore.condition, ProbeScore.question, ProbeScore.score)
                .where(ProbeScore.study_id == study_id, ProbeScore.current.is_(True))
                .order_by(ProbeScore.score.desc(), ProbeScore.condition)
            )
        ]
        study_urgency = session.execute(select(Study.urgency).where(Study.id == study_id)).scalar_one()
        not_shown: dict[str, list[dict[str, Any]]] = {}
        if images:
            manifest = Path(images[0][0]).parent / MANIFEST_NAME
            if manifest.exists():
                not_shown = read_manifest(manifest).not_shown
        return {
            "study_instance_uid": study_uid,
            "report_id": report.id,
            "urgency": study_urgency,
            "report_urgency": report.urgency,
            "urgency_reason": urgency_reason(study_urgency, report.urgency, probes, settings),
            "probe_scores": probes,
            "parse_status": report.parse_status,
            "draft": report.draft_text,
            "structured": report.structured,
            "raw_output": report.raw_output,
            "thinking": report.thinking,
            "model_id": report.model_id,
            "prompt_version": report.prompt_version,
            "images": [{"path": p, "width": w, "height": h, "window": win} for p, w, h, win in images],
            "not_shown": not_shown,
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
    # this process renders the PNGs itself: they are on this host, whatever PREREAD_IMAGES_URL says
    settings = settings.model_copy(update={"images_url": None})
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

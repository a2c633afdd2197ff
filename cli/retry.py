"""``preread retry``: put studies back at the right stage now (idempotent)."""

from __future__ import annotations

from typing import Annotated

import typer

STAGES = ("render", "infer")
STATES = ("FAILED", "STABLE", "RENDERED", "DRAFTED", "EXPORTED")


def retry(
    study_uids: Annotated[list[str] | None, typer.Argument(help="Study Instance UIDs (default: every study in --state).")] = None,
    state: Annotated[str | None, typer.Option(help="Only studies in this state (default FAILED when no UID is given).")] = None,
    stage: Annotated[str | None, typer.Option(help="Back to this stage: render or infer (default: where it stopped).")] = None,
) -> None:
    """Send studies back to render or infer; also asks not-ready infer workers to check their model again."""
    from preread.schemas.settings import get_settings
    from preread.schemas.tables import StudyState
    from preread.worker.pipeline.recovery import retry_studies

    if stage is not None and stage not in STAGES:
        typer.echo(f"preread retry: unknown --stage {stage!r}; choose render or infer", err=True)
        raise typer.Exit(2)
    if state is not None and state.upper() not in STATES:
        typer.echo(f"preread retry: unknown --state {state!r}; choose one of {', '.join(STATES)}", err=True)
        raise typer.Exit(2)
    uids = list(study_uids or [])
    chosen = StudyState(state.upper()) if state else (None if uids else StudyState.FAILED)
    done, missing = retry_studies(get_settings(), uids, chosen, stage)
    for uid in missing:
        typer.echo(f"{uid}: no such study")
    for r in done:
        typer.echo(f"{r.study_uid}: {r.was} -> {r.stage}: {r.note}" if r.stage else f"{r.study_uid}: {r.note}")
    if not done and not missing:
        typer.echo(f"nothing to retry (no study in {chosen})" if chosen else "nothing to retry")
    raise typer.Exit(1 if missing else 0)

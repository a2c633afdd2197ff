"""``preread export``: send drafts (again) to the destinations, including drafts made before an exporter was on."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import typer


def _since(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        typer.echo(f"preread export: --since {value!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM", err=True)
        raise typer.Exit(2) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def export(
    study_uids: Annotated[list[str] | None, typer.Argument(help="Study Instance UIDs (default: every DRAFTED study).")] = None,
    since: Annotated[str | None, typer.Option(help="Drafts made on or after this date (UTC), exported or not.")] = None,
    destination: Annotated[list[str] | None, typer.Option(help="fhir or webhook (default: the enabled ones); repeatable.")] = None,
) -> None:
    """Send the current drafts of the chosen studies; sending one again is harmless."""
    from preread.schemas.settings import get_settings
    from preread.worker.exporters.resend import export_again
    from preread.worker.exporters.step import DESTINATIONS, enabled_destinations

    settings = get_settings()
    chosen = list(destination or enabled_destinations(settings))
    unknown = [d for d in chosen if d not in DESTINATIONS]
    if unknown:
        typer.echo(f"preread export: unknown destination {unknown[0]!r}; choose {' or '.join(DESTINATIONS)}", err=True)
        raise typer.Exit(2)
    if not chosen:
        typer.echo("preread export: no exporter is enabled; set PREREAD_EXPORT_FHIR=true or PREREAD_WEBHOOK_URL, "
                   "or pass --destination fhir", err=True)
        raise typer.Exit(2)
    if "webhook" in chosen and not settings.webhook_url:
        typer.echo("preread export: the webhook destination needs PREREAD_WEBHOOK_URL", err=True)
        raise typer.Exit(2)
    results, missing = export_again(settings, list(study_uids or []), _since(since) if since else None, chosen)
    for uid in missing:
        typer.echo(f"{uid}: no drafted study")
    failed = 0
    for uid, error in results:
        typer.echo(f"{uid}: {'sent to ' + ', '.join(chosen) if error is None else 'not sent: ' + error}")
        failed += error is not None
    if not results and not missing:
        typer.echo("nothing to export")
    raise typer.Exit(1 if failed or missing else 0)

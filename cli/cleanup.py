"""``preread cleanup``: remove stored instances, PNGs and quarantine past ``PREREAD_RETENTION_DAYS``."""

from __future__ import annotations

from typing import Annotated

import typer


def cleanup(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove files of finished studies older than the retention limit (reports and every row are kept)."""
    from preread.ingest.storage.retention import RetentionOff, cleanup as run_cleanup
    from preread.schemas.database import upgrade
    from preread.schemas.settings import get_settings

    settings = get_settings()
    upgrade(settings.effective_database_url)
    try:
        result = run_cleanup(settings, dry_run=dry_run)
    except RetentionOff as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for uid in result.studies:
        typer.echo(f"{'would remove' if dry_run else 'removed'} files of study {uid}")
    typer.echo(result.summary())

"""``preread export``: send current reports again, to every destination or one, and show where they stand."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from preread.schemas.settings import Settings


def _settings() -> Settings:
    """The settings, imported when a command runs (``preread --help`` loads no settings machinery)."""
    from preread.schemas.settings import get_settings

    return get_settings()


ERR = Console(stderr=True)


def export(
    study_uids: Annotated[list[str] | None, typer.Argument(help="Study Instance UIDs; default every drafted study.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Only studies drafted at or after this date/time (UTC).")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination (its name in the settings).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Make the matching deliveries due now, send them, and print each delivery's state."""
    from sqlalchemy import select

    from preread.schemas.database import session_scope, upgrade
    from preread.schemas.tables import Delivery, Report, Study
    from preread.worker.exporters.deliveries import deliver_due, plan, resend
    from preread.worker.exporters.destinations import DestinationError, destinations_from_settings

    settings = _settings()
    try:
        destinations = destinations_from_settings(settings)
    except DestinationError as exc:
        ERR.print(f"[red]error:[/red] {exc}\nFix the [[destinations]] tables in the file PREREAD_CONFIG_FILE names.")
        raise typer.Exit(2) from None
    if destination is not None and destination not in {d.name for d in destinations}:
        names = ", ".join(d.name for d in destinations) or "none configured"
        ERR.print(f"[red]error:[/red] no destination named {destination!r} (configured: {names}).")
        raise typer.Exit(2)
    if not destinations:
        ERR.print("[red]error:[/red] no destinations: add [[destinations]] to the settings file, "
                  "or set PREREAD_EXPORT_FHIR / PREREAD_WEBHOOK_URL.")
        raise typer.Exit(2)
    chosen = [d for d in destinations if destination is None or d.name == destination]
    since_utc = since.replace(tzinfo=timezone.utc) if since is not None and since.tzinfo is None else since
    try:
        upgrade(settings.effective_database_url)
        with session_scope(settings.effective_database_url) as session:
            stmt = select(Study.id).join(Report, Report.study_id == Study.id).where(Report.current.is_(True))
            if study_uids:
                stmt = stmt.where(Study.study_instance_uid.in_(study_uids))
            if since_utc is not None:
                stmt = stmt.where(Report.created_at >= since_utc)
            ids = list(session.scalars(stmt))
            # A draft no destination has planned yet gets every destination's row, as the coordinator's pass
            # would give it (else --destination would leave it EXPORTED with the others never planned) ...
            planned = plan(session, destinations, study_ids=ids)
            # ... and the chosen destinations a row where a report has none (one configured later).
            planned += plan(session, chosen, fill_missing=True, study_ids=ids)
            reset = resend(session, study_ids=ids, destination=destination)
        deliver_due(settings, wait=True, only=destination)
        with session_scope(settings.effective_database_url) as session:
            rows = session.execute(
                select(Study.study_instance_uid, Delivery.destination, Delivery.state, Delivery.attempts, Delivery.last_error)
                .join(Study, Study.id == Delivery.study_id)
                .where(Delivery.study_id.in_(ids), Delivery.report_id.in_(select(Report.id).where(Report.current.is_(True))))
                .order_by(Study.id, Delivery.destination)
            ).all()
    except Exception as exc:
        if debug:
            raise
        ERR.print(f"[red]error:[/red] {type(exc).__name__}: {exc}. Check PREREAD_DATABASE_URL; --debug shows the traceback.")
        raise typer.Exit(2) from None
    table = Table(title=f"Deliveries ({planned} new, {reset} sent again)", show_edge=False)
    for column in ("study", "destination", "state", "attempts", "last error"):
        table.add_column(column)
    for uid, name, state, attempts, error in rows:
        table.add_row(uid, name, state, str(attempts), error or "")
    Console().print(table)

"""``preread api``: the reading queue's HTTP API and dashboard."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console


def api(
    port: Annotated[int | None, typer.Option(help="TCP port (default PREREAD_API_PORT, 8080).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default PREREAD_API_HOST, 127.0.0.1).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    debug: Annotated[bool, typer.Option(help="Show tracebacks of start-up errors.")] = False,
) -> None:
    """Serve the worklist API (/api/v1, /docs) and the dashboard (/)."""
    from preread.api.server import ApiConfigError, check_settings, dashboard_url, serve
    from preread.schemas.database import upgrade
    from preread.schemas.settings import get_settings

    settings = get_settings()
    overrides = {k: v for k, v in {"api_port": port, "api_host": host}.items() if v is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    err = Console(stderr=True)
    try:
        check_settings(settings)
        upgrade(settings.effective_database_url)
    except ApiConfigError as exc:
        if debug:
            raise
        err.print(f"[red]preread api:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    err.print(f"dashboard and API on {dashboard_url(settings)} (docs at {dashboard_url(settings)}docs)", highlight=False)
    serve(settings, log_level)

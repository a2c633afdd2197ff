"""``preread db``: database maintenance."""

from __future__ import annotations

import typer
from rich.console import Console

from preread.schemas.database import upgrade as _upgrade
from preread.schemas.settings import get_settings

db_app = typer.Typer(no_args_is_help=True, help="Database schema and maintenance.")


@db_app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Alembic revision to migrate to.")) -> None:
    """Create or migrate the database at PREREAD_DATABASE_URL (default: SQLite in the data dir)."""
    url = get_settings().effective_database_url
    _upgrade(url, revision)
    Console(stderr=True).print(f"database upgraded to {revision}: {_redact(url)}")


def _redact(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)

"""``preread db``: database maintenance."""

from __future__ import annotations

from pathlib import Path

import typer

db_app = typer.Typer(no_args_is_help=True, help="Database schema and maintenance.")


@db_app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Alembic revision to migrate to.")) -> None:
    """Create or migrate the database at PREREAD_DATABASE_URL (default: SQLite in the data dir)."""
    from rich.console import Console

    from preread.cli.errors import mask_url
    from preread.schemas.database import upgrade as _upgrade
    from preread.schemas.settings import get_settings

    url = get_settings().effective_database_url
    _upgrade(url, revision)
    Console(stderr=True).print(f"database upgraded to {revision}: {mask_url(url)}", highlight=False)


def require_database(url: str) -> None:
    """Raise an :class:`~preread.cli.errors.OperatorError` unless ``url`` names an existing, migrated database.

    Creates nothing: for commands that only read (``preread status``).
    """
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from preread.cli.errors import OperatorError, mask_url
    from preread.schemas.database import engine_for

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():
            raise OperatorError(
                f"no database at {Path(parsed.database).resolve()}\n"
                f"set PREREAD_DATA_DIR (or PREREAD_DATABASE_URL) to where `preread run` keeps it, "
                f"or create it with `preread db upgrade`"
            )
    with engine_for(url).connect() as conn:
        migrated = inspect(conn).has_table("alembic_version")
    if not migrated:
        raise OperatorError(
            f"the database at {mask_url(url)} has no preread tables (PREREAD_DATABASE_URL)\n"
            f"create them with `preread db upgrade`"
        )

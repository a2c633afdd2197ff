"""``preread token``: create, list and revoke the API's tokens."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from preread.schemas.roles import ApiRole

token_app = typer.Typer(no_args_is_help=True, help="API tokens for the reading queue (only hashes are stored).")


def _url() -> str:
    from preread.schemas.database import upgrade
    from preread.schemas.settings import get_settings

    url = get_settings().effective_database_url
    upgrade(url)
    return url


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what uses the token (letters, digits, . _ @ -).")],
    role: Annotated[ApiRole, typer.Option(help="read: the worklist; write: also answer and reprocess; admin; worker: health, metrics and a GPU host's PNGs.")] = ApiRole.READ,
) -> None:
    """Create a token and print it once: it cannot be shown again."""
    from preread.api.tokens import TokenError, create_token
    from preread.schemas.database import session_scope

    try:
        with session_scope(_url()) as session:
            token = create_token(session, name, role)
    except TokenError as exc:
        Console(stderr=True).print(f"[red]preread token:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    typer.echo(token)
    Console(stderr=True).print(f"token {name!r} ({role}) created; it is shown only this once", highlight=False)


@token_app.command("list")
def list_() -> None:
    """List tokens (names, roles, dates; never secrets)."""
    from preread.api.tokens import list_tokens
    from preread.schemas.database import session_scope

    with session_scope(_url()) as session:
        tokens = list_tokens(session)
    table = Table("name", "role", "created", "revoked")
    for t in tokens:
        table.add_row(t.name, t.role, f"{t.created_at:%Y-%m-%d %H:%M}", f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "")
    Console().print(table)


@token_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    from preread.api.tokens import TokenError, revoke_token
    from preread.schemas.database import session_scope

    try:
        with session_scope(_url()) as session:
            revoke_token(session, name)
    except TokenError as exc:
        Console(stderr=True).print(f"[red]preread token:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    Console(stderr=True).print(f"token {name!r} revoked", highlight=False)

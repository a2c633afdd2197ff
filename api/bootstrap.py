"""First start on the embedded default: an admin token in a private file, so the dashboard opens at once."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import func, select

from preread.api.server import dashboard_url
from preread.api.tokens import create_token
from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import ApiRole, ApiToken

ADMIN_TOKEN_FILE = "api-admin-token"
ADMIN_TOKEN_NAME = "admin"


def admin_token_path(settings: Settings) -> Path:
    """Where the first run's admin token is written (mode 0600)."""
    return settings.data_dir / ADMIN_TOKEN_FILE


def ensure_first_admin_token(settings: Settings) -> Path | None:
    """On the embedded default with no token yet, create an admin token and write it to its file.

    Returns the file when it holds a token (made now or by an earlier run); None on a
    configured database (its operator makes tokens with ``preread token create``).
    """
    if settings.database_url:
        return None
    path = admin_token_path(settings)
    with session_scope(settings.effective_database_url) as session:
        if session.scalar(select(func.count()).select_from(ApiToken)):
            return path if path.is_file() else None
        token = create_token(session, ADMIN_TOKEN_NAME, ApiRole.ADMIN)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def dashboard_banner(settings: Settings) -> str:
    """One or two lines for ``preread run``: the dashboard's URL and where the admin token is."""
    line = f"dashboard: {dashboard_url(settings)} (API docs at {dashboard_url(settings)}docs)"
    path = ensure_first_admin_token(settings)
    if path is not None:
        line += f"\nsign in with the admin token in {path.resolve()} (readable only by you)"
    else:
        line += "\nsign in with a token from `preread token create NAME --role read`"
    return line

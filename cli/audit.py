"""``preread audit``: who viewed or answered which study, when and from where."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str) -> datetime:
    """'30m', '12h', '7d', or an ISO 8601 time (UTC when it has no zone)."""
    match = _AGO.match(value.strip())
    if match:
        return datetime.now(timezone.utc) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter("use a duration like 30m, 12h, 7d or a time like 2026-11-30T08:00") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def audit(
    since: Annotated[str, typer.Option(help="Events since: 30m, 12h, 7d or an ISO 8601 time.")] = "24h",
    limit: Annotated[int, typer.Option(help="At most this many events.")] = 10000,
) -> None:
    """Print the audit trail: views of studies, images and reports, feedback, reprocess requests."""
    from preread.api.audit import events_since
    from preread.schemas.database import session_scope, upgrade
    from preread.schemas.settings import get_settings

    start = parse_since(since)
    url = get_settings().effective_database_url
    upgrade(url)
    with session_scope(url) as session:
        events = events_since(session, start, limit)
    table = Table("time (UTC)", "token", "action", "study", "client", "detail")
    for e in events:
        table.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.token_name, e.action, e.study_instance_uid or "", e.client or "", e.detail or "")
    Console(width=200).print(table)

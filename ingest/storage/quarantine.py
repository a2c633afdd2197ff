"""Quarantine: refused bytes kept with a reason file that holds no patient data."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from preread.ingest.storage.files import write_atomic
from preread.ingest.storage.layout import SUFFIX


def quarantine(
    folder: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    reason: str,
    calling_ae: str = "",
    transfer_syntax: str = "",
    status: int | None = None,
    sync: bool = True,
) -> Path:
    """Keep refused bytes as ``<timestamp>-<random>.dcm`` with a ``.reason.txt`` beside them.

    The reason file holds only what is safe to read aloud: the reason, the
    calling AE, transfer syntax and status, never patient data.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    name = f"{stamp}-{secrets.token_hex(4)}"
    target = folder / f"{name}{SUFFIX}"
    size = write_atomic(target, chunks, sync=sync)
    lines = [
        f"reason: {_one_line(reason)}",
        f"calling_ae: {_one_line(calling_ae)}",
        f"transfer_syntax: {_one_line(transfer_syntax)}",
        f"size_bytes: {size}",
        f"received_at: {datetime.now(timezone.utc).isoformat()}",
    ]
    if status is not None:
        lines.append(f"status: 0x{status:04X}")
    write_atomic(folder / f"{name}.reason.txt", [("\n".join(lines) + "\n").encode()], sync=sync)
    return target


def _one_line(text: str) -> str:
    """Printable, single-line, bounded text for the reason file."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return cleaned[:500]

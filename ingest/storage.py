"""Durable files for received instances, and quarantine for refused ones.

An instance lives at ``studies/<study>/<series>/<sop>.dcm`` under the storage
dir, a path built only from validated UIDs so that nothing a peer sends can
steer a write outside it. Writes are crash-safe: temporary file in the same
folder, ``fsync``, atomic ``rename``, then ``fsync`` of the folder, so a file
either exists complete after ``kill -9`` or power loss, or not at all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ingest.catalog import InstanceIdentity, is_valid_uid

#: Suffix of a stored instance.
SUFFIX = ".dcm"

_known_dirs: set[Path] = set()
_known_dirs_lock = threading.Lock()


class UnsafePath(ValueError):
    """A UID that is not safe to use as a path component."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    """Where an instance was kept, its size, and whether this call wrote it."""

    path: Path
    size: int
    written: bool


def instance_path(root: Path, ident: InstanceIdentity) -> Path:
    """``root/<study>/<series>/<sop>.dcm``; raises :class:`UnsafePath` on an invalid UID."""
    parts = (ident.study_uid, ident.series_uid, ident.sop_instance_uid)
    for uid in parts:
        if not is_valid_uid(uid):
            raise UnsafePath("UID is not a valid DICOM UID")
    return root.joinpath(parts[0], parts[1], parts[2] + SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new child) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` and its parents durably (each new entry fsynced in its parent).

    Folders already seen by this process are skipped without a syscall.
    """
    if path in _known_dirs:
        return
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            pass
        fsync_dir(folder.parent)
    with _known_dirs_lock:
        if len(_known_dirs) > 50_000:
            _known_dirs.clear()
        _known_dirs.add(path)


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview], *, overwrite: bool = True) -> int:
    """Write ``chunks`` to ``path`` crash-safely; returns the byte count.

    With ``overwrite=False`` an existing file is kept (``link`` instead of
    ``rename``) and :class:`FileExistsError` is raised.
    """
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the path exists: first copy wins
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return size


def store_instance(root: Path, ident: InstanceIdentity, chunks: Iterable[bytes | memoryview]) -> StoredFile:
    """Keep one copy of an instance under ``root``; a duplicate SOP Instance UID keeps the first.

    The existing file of a duplicate was fsynced before it was renamed into
    place, so it is complete even if its database row was never written.
    """
    path = instance_path(root, ident)
    try:
        return StoredFile(path, path.stat().st_size, False)
    except FileNotFoundError:
        pass
    try:
        size = write_atomic(path, chunks, overwrite=False)
    except FileExistsError:  # a concurrent association stored it first
        return StoredFile(path, path.stat().st_size, False)
    return StoredFile(path, size, True)


def sweep_temporary(root: Path, older_than: float = 600.0) -> int:
    """Remove temporary files left by a killed writer (``.<name>.<hex>.tmp``); returns how many.

    Only files older than ``older_than`` seconds go, so a sibling process's
    write in progress is never touched.
    """
    removed = 0
    cutoff = time.time() - older_than
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                path = os.path.join(folder, name)
                try:
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    pass
    return removed


def has_free_space(path: Path, min_free_bytes: int, incoming: int = 0) -> bool:
    """Whether the file system of ``path`` keeps ``min_free_bytes`` after ``incoming`` more."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free - incoming >= min_free_bytes


def quarantine(
    folder: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    reason: str,
    calling_ae: str = "",
    transfer_syntax: str = "",
    status: int | None = None,
) -> Path:
    """Keep refused bytes as ``<timestamp>-<random>.dcm`` with a ``.reason.txt`` beside them.

    The reason file holds only what is safe to read aloud: the reason, the
    calling AE, transfer syntax and status, never patient data.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    name = f"{stamp}-{secrets.token_hex(4)}"
    target = folder / f"{name}{SUFFIX}"
    size = write_atomic(target, chunks)
    lines = [
        f"reason: {_one_line(reason)}",
        f"calling_ae: {_one_line(calling_ae)}",
        f"transfer_syntax: {_one_line(transfer_syntax)}",
        f"size_bytes: {size}",
        f"received_at: {datetime.now(timezone.utc).isoformat()}",
    ]
    if status is not None:
        lines.append(f"status: 0x{status:04X}")
    write_atomic(folder / f"{name}.reason.txt", [("\n".join(lines) + "\n").encode()])
    return target


def _one_line(text: str) -> str:
    """Printable, single-line, bounded text for the reason file."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return cleaned[:500]

"""Crash-safe file writes: folders made durably, unnamed files made ahead, atomic writes, leftovers swept.

A file is written to a temporary file in its folder, ``fsync``-ed, renamed
(or linked) into place, then the folder is ``fsync``-ed, so that it exists
complete after ``kill -9`` or power loss, or not at all. With ``sync=False``
(``PREREAD_SYNC_WRITES=false``) the two ``fsync`` calls are skipped: the
rename still makes a file appear only complete, which the page cache keeps
across a killed process, but not across an OS crash or power loss. The
listener takes its temporary files from a :class:`FilePool` of unnamed files
made ahead in the storage folder and links them into place.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from collections.abc import Iterable
from pathlib import Path

_known_dirs: set[Path] = set()
_known_dirs_lock = threading.Lock()

def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new child) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, sync: bool = True) -> None:
    """Create ``path`` and its parents durably (each new entry fsynced in its parent unless ``sync`` is false).

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
        if sync:
            fsync_dir(folder.parent)
    with _known_dirs_lock:
        if len(_known_dirs) > 50_000:
            _known_dirs.clear()
        _known_dirs.add(path)


def write_all(fd: int, chunks: Iterable[bytes | memoryview]) -> int:
    """Write every chunk to ``fd`` (one ``writev`` unless the kernel takes less); returns the byte count."""
    size = 0
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    while views:
        n = os.writev(fd, views)
        size += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return size


class FilePool:
    """Unnamed empty files (``O_TMPFILE``) in one folder, made ahead of need by a background thread.

    Creating a file costs the file system an inode allocation (a fifth to
    half a millisecond here); taking a ready one moves that off the path
    between receiving an instance and answering for it. A pooled file has
    no name until :func:`write_atomic` links it into place, so a killed
    process leaves nothing behind. Where ``O_TMPFILE`` or ``/proc/self/fd``
    is missing, :attr:`supported` is false and writers use named temporary
    files as before.
    """

    def __init__(self, folder: Path, size: int = 4) -> None:
        self.folder = folder
        self._ready: queue.Queue[int] = queue.Queue(maxsize=size)
        self._closed = threading.Event()
        self._dir_fd = -1
        self.supported = self._probe()
        if self.supported:
            threading.Thread(target=self._fill, name="preread-file-pool", daemon=True).start()

    def _probe(self) -> bool:
        if not hasattr(os, "O_TMPFILE"):
            return False
        try:
            self._dir_fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fd = os.open(self.folder, os.O_TMPFILE | os.O_RDWR, 0o640)
        except OSError:
            return False
        probe = self.folder / f".probe.{secrets.token_hex(6)}.tmp"
        try:
            self.link(fd, probe)
            os.unlink(probe)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def link(self, fd: int, path: Path) -> None:
        """Give the pooled file ``fd`` the name ``path``; :class:`FileExistsError` if it exists."""
        # a dir fd makes os.link call linkat(AT_SYMLINK_FOLLOW), which follows the /proc link to the file
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=self._dir_fd)

    def _fill(self) -> None:
        while not self._closed.is_set():
            try:
                fd = os.open(self.folder, os.O_TMPFILE | os.O_RDWR, 0o640)
            except OSError:
                self._closed.wait(1.0)  # e.g. the folder is gone or the disk is full: writers fall back
                continue
            while True:
                try:
                    self._ready.put(fd, timeout=0.5)
                    break
                except queue.Full:
                    if self._closed.is_set():
                        os.close(fd)
                        return
            if self._closed.is_set():
                self._drain()

    def take(self) -> int | None:
        """A ready file descriptor, or ``None`` when none is ready."""
        if not self.supported or self._closed.is_set():
            return None
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop making files and close the ready ones (a write holding one still links it)."""
        self._closed.set()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                os.close(self._ready.get_nowait())
            except queue.Empty:
                break

    def __del__(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)


def write_atomic(
    path: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    overwrite: bool = True,
    sync: bool = True,
    pool: FilePool | None = None,
) -> int:
    """Write ``chunks`` to ``path`` crash-safely; returns the byte count.

    With ``overwrite=False`` an existing file is kept (``link`` instead of
    ``rename``) and :class:`FileExistsError` is raised; such a write takes
    its file from ``pool`` when one is ready (same file system as ``path``).
    With ``sync=False`` nothing is fsynced (safe against a killed process,
    not against power loss).
    """
    ensure_dir(path.parent, sync=sync)
    fd = pool.take() if pool is not None and not overwrite else None
    if fd is not None:
        try:
            size = write_all(fd, chunks)
            if sync:
                os.fsync(fd)
            pool.link(fd, path)  # type: ignore[union-attr]  # fails if the path exists: first copy wins
        finally:
            os.close(fd)  # an unlinked file goes with its descriptor
        if sync:
            fsync_dir(path.parent)
        return size
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            size = write_all(fd, chunks)
            if sync:
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
    if sync:
        fsync_dir(path.parent)
    return size

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

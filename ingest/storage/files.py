"""Durable files for received instances, and quarantine for refused ones.

An instance lives at ``studies/<study>/<series>/<sop>.dcm`` under the storage
dir, a path built only from validated UIDs so that nothing a peer sends can
steer a write outside it. Writes are crash-safe: temporary file in the same
folder, ``fsync``, atomic ``rename``, then ``fsync`` of the folder, so a file
either exists complete after ``kill -9`` or power loss, or not at all. With
``sync=False`` (``PREREAD_SYNC_WRITES=false``) the two ``fsync`` calls are
skipped: the rename still makes a file appear only complete, which the page
cache keeps across a killed process, but not across an OS crash or power loss.
The listener takes its temporary files from a :class:`FilePool` of unnamed
files made ahead in the storage folder and links them into place; a
:class:`Spool` is such a file filled while the data set is still arriving,
its write-back to disk started fragment by fragment, so that the ``fsync``
before the answer has little left to wait for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from preread.ingest.assembly.catalog import InstanceIdentity, is_valid_uid

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


def _write_all(fd: int, chunks: Iterable[bytes | memoryview]) -> int:
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
    if pool is not None and fd is not None:
        try:
            size = _write_all(fd, chunks)
            if sync:
                os.fsync(fd)
            pool.link(fd, path)  # fails if the path exists: first copy wins
        finally:
            os.close(fd)  # an unlinked file goes with its descriptor
        if sync:
            fsync_dir(path.parent)
        return size
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            size = _write_all(fd, chunks)
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


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
#: ``SYNC_FILE_RANGE_WRITE``: start write-back of dirty pages, do not wait.
_SYNC_FILE_RANGE_WRITE = 2


_closing: queue.SimpleQueue[int] = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer: threading.Thread | None = None


def _close_in_background(fd: int) -> None:
    """Close ``fd`` on a helper thread: ext4 releases a file's block reservations on close, a
    few tenths of a millisecond that need not delay an answer."""
    global _closer
    if _closer is None or not _closer.is_alive():
        with _closer_lock:
            if _closer is None or not _closer.is_alive():
                _closer = threading.Thread(target=_close_loop, name="preread-closer", daemon=True)
                _closer.start()
    _closing.put(fd)


def _close_loop() -> None:
    while True:
        fd = _closing.get()
        try:
            os.close(fd)
        except OSError:
            pass


class Spool:
    """An unnamed pooled file that receives an instance's bytes as they arrive.

    :meth:`write` appends and (with ``sync``) starts the kernel's write-back
    at once; :meth:`data_set` maps the bytes back for checking; :meth:`commit`
    then fsyncs, links the file into place and fsyncs the folder, as
    :func:`write_atomic` does. A spool that is never committed disappears
    with its descriptor. After a failed write the spool is :attr:`broken`.
    """

    def __init__(self, fd: int, pool: FilePool, sync: bool) -> None:
        self.fd = fd
        self.pool = pool
        self.sync = sync
        self.size = 0
        self.broken = False
        #: the Part 10 header written first (set by whoever opens the spool)
        self.head = b""

    @classmethod
    def open(cls, pool: FilePool | None, *, sync: bool = True) -> Spool | None:
        """A spool on a ready pooled file, or ``None`` when none is ready."""
        fd = pool.take() if pool is not None else None
        return cls(fd, pool, sync) if pool is not None and fd is not None else None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; an ``OSError`` marks the spool broken (and is not raised)."""
        if self.broken or self.fd < 0:
            return
        try:
            self.size += _write_all(self.fd, (data,))
            if self.sync and _sync_file_range is not None:
                _sync_file_range(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        except OSError:
            self.broken = True

    def commit(self, path: Path) -> bool:
        """Make the bytes durable under ``path``; ``False`` if ``path`` already exists (the first copy wins)."""
        if self.broken or self.fd < 0:
            raise OSError("spool is not usable")
        ensure_dir(path.parent, sync=self.sync)
        try:
            if self.sync:
                os.fsync(self.fd)
            try:
                self.pool.link(self.fd, path)
            except FileExistsError:
                return False
        finally:
            self.close()
        if self.sync:
            fsync_dir(path.parent)
        return True

    @contextlib.contextmanager
    def data_set(self) -> Iterator[memoryview]:
        """The bytes after :attr:`head`, mapped read-only from the page cache (no copy)."""
        if self.broken or self.fd < 0:
            raise OSError("spool is not usable")
        if self.size <= len(self.head):
            yield memoryview(b"")
            return
        with mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ) as mapped:
            whole = memoryview(mapped)
            view = whole[len(self.head):]
            try:
                yield view
            finally:
                view.release()
                whole.release()

    def close(self) -> None:
        """Drop the descriptor (in the background); the file goes too unless committed."""
        if self.fd >= 0:
            _close_in_background(self.fd)
            self.fd = -1


def store_instance(
    root: Path,
    ident: InstanceIdentity,
    chunks: Iterable[bytes | memoryview],
    *,
    sync: bool = True,
    pool: FilePool | None = None,
    spool: Spool | None = None,
) -> StoredFile:
    """Keep one copy of an instance under ``root``; a duplicate SOP Instance UID keeps the first.

    The bytes are ``chunks``, or, given a ``spool`` holding them already,
    the spool's (committed in place; ``chunks`` is then not read).

    The existing file of a duplicate was written to a temporary file and
    renamed into place (fsynced first unless ``sync`` is false), so it is
    complete even if its database row was never written.
    """
    path = instance_path(root, ident)
    try:
        existing = os.stat(path).st_size
    except FileNotFoundError:
        pass
    else:
        if spool is not None:
            spool.close()
        return StoredFile(path, existing, False)
    try:
        if spool is not None:
            size = spool.size
            if not spool.commit(path):
                raise FileExistsError(path)
        else:
            size = write_atomic(path, chunks, overwrite=False, sync=sync, pool=pool)
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

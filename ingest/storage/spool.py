"""The spool: an unnamed pooled file that receives an instance's bytes while they are still arriving.

Its write-back to disk is started fragment by fragment, so that the ``fsync``
before the answer has little left to wait for; its descriptor is closed on a
helper thread (ext4 releases block reservations on close).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from preread.ingest.storage.files import FilePool, ensure_dir, fsync_dir, write_all


def _load_sync_file_range():  # type: ignore[no-untyped-def]
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
        return cls(fd, pool, sync) if fd is not None else None  # type: ignore[arg-type]

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; an ``OSError`` marks the spool broken (and is not raised)."""
        if self.broken or self.fd < 0:
            return
        try:
            self.size += write_all(self.fd, (data,))
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

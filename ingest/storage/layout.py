"""Where an instance lives: ``studies/<study>/<series>/<sop>.dcm`` under the storage dir.

The path is built only from validated UIDs
(:func:`~preread.ingest.assembly.catalog.is_valid_uid`), so nothing a peer
sends can steer a write outside the storage dir. The first copy of a SOP
Instance UID is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from preread.ingest.assembly.catalog import InstanceIdentity, is_valid_uid
from preread.ingest.storage.files import FilePool, write_atomic
from preread.ingest.storage.spool import Spool


#: Suffix of a stored instance.
SUFFIX = ".dcm"

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

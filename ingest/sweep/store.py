"""Instances a sweep fetches itself (C-GET, WADO-RS, folder) stored exactly as the listener stores them.

C-GET sub-operations are C-STORE requests on our own association: they go to
the listener's handler (:func:`ingest.listener.ae.handle_store`) with a
:class:`~ingest.listener.ae.IngestContext` of the sweep's. Part 10 files
(WADO-RS parts, folder files) are checked with the listener's structure walk
and written through the same ``store_instance`` and ``InstanceIndex``.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom import dcmread

from preread.ingest.assembly.catalog import identity_of
from preread.ingest.assembly.index import InstanceIndex
from preread.ingest.listener.handlers import IngestContext
from preread.ingest.listener.structure import Malformed, check_structure, header_dataset
from preread.ingest.storage.layout import store_instance
from preread.ingest.storage.space import has_free_space
from preread.ingest.storage.part10 import file_meta_bytes
from preread.schemas.database import engine_for
from preread.schemas.settings import Settings

_PREAMBLE = 128
_ELEMENT = struct.Struct("<HH2sH")
_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"}


def ingest_context(settings: Settings) -> IngestContext:
    """An ingest context writing where the listener writes, with its own index engine."""
    ctx = IngestContext(
        storage_dir=settings.storage_dir.resolve(),
        quarantine_dir=settings.quarantine_dir.resolve(),
        min_free_bytes=settings.min_free_bytes,
        index=InstanceIndex(engine_for(settings.effective_database_url, sync_writes=settings.sync_writes, pre_ping=False)),
        sync_writes=settings.sync_writes,
    )
    ctx.storage_dir.mkdir(parents=True, exist_ok=True)
    return ctx


def split_part10(data: bytes) -> tuple[str, int]:
    """(transfer syntax UID, offset of the data set) of a Part 10 file's bytes."""
    if len(data) < _PREAMBLE + 4 or data[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
        raise Malformed("not a DICOM Part 10 file (no DICM prefix)")
    pos = _PREAMBLE + 4
    syntax = ""
    while pos + 8 <= len(data):
        group, elem, vr, length = _ELEMENT.unpack_from(data, pos)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            start = pos + 12
        else:
            start = pos + 8
        if elem == 0x0010:
            syntax = data[start : start + length].decode("ascii", "replace").strip("\x00 ")
        pos = start + length
    if not syntax:
        raise Malformed("file meta has no Transfer Syntax UID")
    return syntax, pos


def store_part10(ctx: IngestContext, data: bytes) -> bool:
    """Check, store and index one Part 10 file's bytes; returns whether its instance row is new.

    Raises :class:`Malformed` (or ``ValueError``) when the bytes cannot be kept.
    """
    syntax, offset = split_part10(data)
    view = memoryview(data)[offset:]
    found = check_structure(view, syntax)
    ds = header_dataset(bytes(data), found, syntax)
    ident = identity_of(ds)
    meta = file_meta_bytes(ident.sop_class_uid, ident.sop_instance_uid, syntax)
    if not has_free_space(ctx.storage_dir, ctx.min_free_bytes, len(view)):
        raise OSError(f"free space below PREREAD_MIN_FREE_BYTES in {ctx.storage_dir}")
    stored = store_instance(ctx.storage_dir, ident, (meta, view), sync=ctx.sync_writes)
    return ctx.index.record(
        ds, ident, stored.path, stored.size, syntax,
        full_header=lambda: dcmread(BytesIO(data), stop_before_pixels=True),
    )

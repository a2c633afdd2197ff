"""The listener's pynetdicom event handlers: C-ECHO, C-STORE, and association notices.

Every accepted instance is written as received (no decode, no re-encode):
its data set goes to an unnamed file as the fragments arrive (see
:mod:`~preread.ingest.listener.transport`), is checked, fsynced and linked
into place, then indexed in one database transaction; only then does the
peer get Success (``sync_writes=False`` skips the fsyncs and the synchronous
commit: an acknowledged instance then survives a killed process, not a
power loss). What cannot be kept is refused with a failure status and, when
the bytes are the problem, kept in quarantine with a reason file. The data
set is in memory once at most (the received bytes, or the spool's page
cache), whichever instance of a series it is. Logs carry UIDs, SOP classes,
sizes, calling AE and statuses, never patient data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from preread.ingest.assembly import release
from preread.ingest.assembly.catalog import InvalidIdentity, identity_of, uid_value
from preread.ingest.assembly.index import InstanceIndex
from preread.ingest.listener import transport
from preread.ingest.listener.statuses import StoreStatus
from preread.ingest.listener.structure import Malformed, check_structure, header_dataset, raw_identity
from preread.ingest.storage import files, layout, quarantine, space
from preread.ingest.storage.spool import Spool
from preread.ingest.storage.part10 import file_meta_bytes

LOGGER = logging.getLogger("preread.ingest.listener")

#: Free space beyond the watermark a spool needs before it starts (the instance's size is not yet known).
SPOOL_HEADROOM = 64 * 1024 * 1024


@dataclass
class IngestContext:
    """What the C-STORE handler needs, built once per listener."""

    storage_dir: Path
    quarantine_dir: Path
    min_free_bytes: int
    index: InstanceIndex
    #: fsync files and folders (``Settings.sync_writes``); the index engine's commits follow the same setting.
    sync_writes: bool = True
    #: Files made ahead in the storage folder (set by :meth:`Listener.start`).
    file_pool: files.FilePool | None = None


def handle_store(event: Event, ctx: IngestContext) -> StoreStatus:
    """``evt.EVT_C_STORE``: keep the instance durably, then answer; refuse what cannot be kept."""
    started = time.perf_counter()
    calling_ae = (event.assoc.requestor.ae_title or "").strip()
    request = cast(C_STORE, event.request)
    transfer_syntax = str(event.context.transfer_syntax)
    sop_class = str(request.AffectedSOPClassUID or "")
    taken = transport.take_spool(event.assoc, request.MessageID)
    if isinstance(taken, StoreStatus):  # refused at the first fragment: nothing was kept, in memory or on disk
        LOGGER.error("C-STORE refused %s at the first fragment: %s (calling AE %s from %s, SOP class %s)",
                     taken, "free space below watermark" if taken == StoreStatus.OUT_OF_RESOURCES
                     else "invalid request", calling_ae, transport.peer_of(event.assoc), _safe(sop_class))
        return taken
    spool = taken
    try:
        if spool is not None:  # the data set went to the spool only
            if spool.broken:
                LOGGER.error("C-STORE refused %s: cannot write %s: spool write failed",
                             StoreStatus.OUT_OF_RESOURCES_NOT_STORED, _safe(request.AffectedSOPInstanceUID))
                return StoreStatus.OUT_OF_RESOURCES_NOT_STORED
            with spool.data_set() as view:
                return _store(event, ctx, view, started, calling_ae, transfer_syntax, sop_class, spool)
        # the received bytes, not copied: a view of pynetdicom's buffer, released before we answer
        with request.DataSet.getbuffer() as view:  # type: ignore[union-attr]
            return _store(event, ctx, view, started, calling_ae, transfer_syntax, sop_class)
    finally:
        if spool is not None:
            spool.close()  # a no-op once committed


def open_spool(ctx: IngestContext) -> transport.SpoolOpener:
    """The listener's spool opener, asked at a C-STORE's first data set fragment.

    Below the free-space watermark it refuses (0xA700: the fragments are
    dropped, never read into memory); near it (less than
    :data:`SPOOL_HEADROOM` above), or when no pooled file is ready, it
    declines and the data set arrives in memory; otherwise a pooled file
    starting with the instance's Part 10 header.
    """

    def opener(sop_class: str, sop_instance: str, transfer_syntax: str) -> Spool | StoreStatus | None:
        if not space.has_free_space(ctx.storage_dir, ctx.min_free_bytes):
            return StoreStatus.OUT_OF_RESOURCES
        if not space.has_free_space(ctx.storage_dir, ctx.min_free_bytes, SPOOL_HEADROOM):
            return None
        spool = Spool.open(ctx.file_pool, sync=ctx.sync_writes)
        if spool is not None:
            spool.head = file_meta_bytes(sop_class, sop_instance, transfer_syntax)
            spool.write(spool.head)
        return spool

    return opener


def _store(event: Event, ctx: IngestContext, view: memoryview, started: float, calling_ae: str, transfer_syntax: str,
           sop_class: str, spool: Spool | None = None) -> StoreStatus:
    """:func:`handle_store` on ``view``, the data set as received (and perhaps already in ``spool``)."""
    request = cast(C_STORE, event.request)
    size = view.nbytes
    if not space.has_free_space(ctx.storage_dir, ctx.min_free_bytes, size):
        LOGGER.error("C-STORE refused %s: free space below watermark (calling AE %s, SOP class %s, %d bytes)",
                     StoreStatus.OUT_OF_RESOURCES, calling_ae, _safe(sop_class), size)
        return StoreStatus.OUT_OF_RESOURCES

    # preamble + file meta, then the bytes as received: what event.encoded_dataset() returns, in two pieces
    request_uid = uid_value(request.AffectedSOPInstanceUID)
    meta = file_meta_bytes(sop_class, request_uid or "", transfer_syntax)
    chunks = (meta, view)
    try:
        found = check_structure(view, transfer_syntax)
        ds = header_dataset(chunks, found, transfer_syntax)
    except Malformed as exc:  # our own messages name offsets only
        return _refuse(ctx, chunks, StoreStatus.CANNOT_UNDERSTAND_MALFORMED, f"malformed data set: {exc}", calling_ae,
                       transfer_syntax, sop_class)
    except Exception as exc:  # a parser's message may quote values (patient data): log its type only
        return _refuse(ctx, chunks, StoreStatus.CANNOT_UNDERSTAND_MALFORMED,
                       f"cannot parse data set: {type(exc).__name__}", calling_ae, transfer_syntax, sop_class)
    try:
        ident = raw_identity(found) or identity_of(ds)
    except InvalidIdentity as exc:
        return _refuse(ctx, chunks, StoreStatus.CANNOT_UNDERSTAND_INVALID_IDENTITY, str(exc), calling_ae,
                       transfer_syntax, sop_class)
    if ident.sop_instance_uid != request_uid or ident.sop_class_uid != sop_class:
        return _refuse(ctx, chunks, StoreStatus.CANNOT_UNDERSTAND_IDENTITY_MISMATCH,
                       "SOP Class/Instance UID differ from the C-STORE request", calling_ae, transfer_syntax, sop_class)

    # the spool holds these very bytes, after this very header (else: copy them to a new file)
    usable = spool is not None and spool.head == meta
    try:
        stored = layout.store_instance(ctx.storage_dir, ident, chunks, sync=ctx.sync_writes, pool=ctx.file_pool,
                                        spool=spool if usable else None)
    except OSError as exc:
        LOGGER.error("C-STORE refused %s: cannot write %s: %s", StoreStatus.OUT_OF_RESOURCES_NOT_STORED,
                     ident.sop_instance_uid, exc.strerror)
        return StoreStatus.OUT_OF_RESOURCES_NOT_STORED
    try:
        # the first instance of a series: the full header is read back from the stored file, not copied
        new_row = ctx.index.record(
            ds, ident, stored.path, stored.size, transfer_syntax,
            full_header=lambda: dcmread(stored.path, stop_before_pixels=True),
        )
    except Exception as exc:
        LOGGER.error("C-STORE refused %s: cannot index %s: %s", StoreStatus.OUT_OF_RESOURCES_NOT_STORED,
                     ident.sop_instance_uid, type(exc).__name__)
        return StoreStatus.OUT_OF_RESOURCES_NOT_STORED

    release.note_stored(event.assoc, ident.study_uid)  # a clean release then hints the study complete
    LOGGER.debug(
        "stored %s (study %s, SOP class %s, %d bytes, %s, from %s%s%s) in %.1f ms",
        ident.sop_instance_uid, ident.study_uid, sop_class, stored.size, transfer_syntax, calling_ae,
        "" if new_row else ", duplicate", ", spooled" if usable else "", (time.perf_counter() - started) * 1000,
    )
    return StoreStatus.SUCCESS


def _refuse(ctx: IngestContext, chunks: tuple[Any, ...], status: StoreStatus, reason: str, calling_ae: str,
            transfer_syntax: str, sop_class: str) -> StoreStatus:
    """Quarantine the bytes with a reason file, log without patient data, return ``status``."""
    where = "not kept"
    try:
        if space.has_free_space(ctx.quarantine_dir, ctx.min_free_bytes, sum(memoryview(c).nbytes for c in chunks)):
            where = quarantine.quarantine(ctx.quarantine_dir, chunks, reason=reason, calling_ae=calling_ae,
                                       transfer_syntax=transfer_syntax, status=int(status), sync=ctx.sync_writes).name
    except OSError as exc:
        where = f"quarantine failed: {exc.strerror}"
    LOGGER.warning("C-STORE refused %s: %s (calling AE %s, SOP class %s, transfer syntax %s, quarantine %s)",
                   status, reason, calling_ae, _safe(sop_class), _safe(transfer_syntax), where)
    return status


def _safe(value: object) -> str:
    """Bounded printable text for a log line (exception texts may quote bytes)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))[:200]


def handle_accepted(event: Event) -> None:
    """``evt.EVT_ACCEPTED``: one line per association (calling AE and address, no patient data)."""
    requestor = event.assoc.requestor
    LOGGER.info("association accepted: calling AE %s from %s:%s", _safe((requestor.ae_title or "").strip()),
                requestor.address, requestor.port)


def handle_closed(event: Event) -> None:
    """``evt.EVT_CONN_CLOSE``: drop the spool of a transfer the peer broke off."""
    transport.close_spools(event.assoc)


def handle_echo(event: Event) -> StoreStatus:
    """``evt.EVT_C_ECHO``: always success."""
    return StoreStatus.SUCCESS

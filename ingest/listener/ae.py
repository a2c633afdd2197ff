"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

Every accepted instance is written as received (no decode, no re-encode):
its data set goes to an unnamed file as the fragments arrive (see
:mod:`ingest.dimse`), is checked, fsynced and linked into place, then
indexed in one database transaction;
only then does the peer get 0x0000 (``sync_writes=False`` skips the fsyncs
and the synchronous commit: an acknowledged instance then survives a killed
process, not a power loss). What cannot be kept is refused with a
DIMSE failure status and, when the bytes are the problem, kept in quarantine
with a reason file. Logs carry UIDs, SOP classes, sizes, calling AE and
statuses, never patient data.

The public entry point for embedding is :class:`Listener`::

    listener = Listener(settings)
    listener.start()          # binds, serves in a thread, starts the stability monitor
    ...
    listener.stop()
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time: no static name
from pynetdicom.transport import ThreadedAssociationServer

from preread.ingest.listener import access
from preread.ingest.listener import transport as dimse
from preread.ingest.storage import files as storage
from preread.ingest.assembly import release
from preread.ingest.assembly.catalog import InstanceIdentity, InvalidIdentity, identity_of, is_valid_uid
from preread.ingest.assembly.index import InstanceIndex
from preread.ingest.storage.part10 import file_meta_bytes
from preread.ingest.assembly.stability import StabilityMonitor
from preread.ingest.listener.tls import server_context
from preread.schemas.database import engine_for
from preread.schemas.settings import Settings

LOGGER = logging.getLogger("preread.ingest.listener")

# C-STORE statuses (PS3.4 B.2.3), pynetdicom style.
#: Success.
SUCCESS = 0x0000
#: Refused: Out of Resources, the disk is below the free-space watermark (nothing written).
OUT_OF_RESOURCES = 0xA700
#: Refused: Out of Resources, the file or its index row could not be written (retry later).
STORE_FAILED = 0xA701
#: Error: Cannot understand, the dataset cannot be parsed (bytes quarantined).
CANNOT_PARSE = 0xC210
#: Error: Cannot understand, Study/Series/SOP Instance/SOP Class UID missing or invalid.
INVALID_IDENTITY = 0xC220
#: Error: Cannot understand, dataset UIDs differ from the C-STORE request's Affected SOP UIDs.
IDENTITY_MISMATCH = 0xC221

#: Transfer syntaxes accepted for every storage SOP class, preferred first.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

#: Associations served at once by one process.
MAX_ASSOCIATIONS = 64
#: Largest P-DATA PDU we accept: fewer, larger PDUs mean less Python per instance.
MAX_PDU_SIZE = 1024 * 1024
#: Largest inflated size of a deflated data set (a deflate bomb is refused, not inflated).
MAX_INFLATED = 1 << 30
#: Free space beyond the watermark a spool needs before it starts (the instance's size is not yet known).
SPOOL_HEADROOM = 64 * 1024 * 1024
#: Seconds a worker sharing the listening socket waits, per association it serves, before accepting another.
ACCEPT_DEFER = 0.025
#: Seconds a TLS handshake may take in the accept loop.
TLS_HANDSHAKE_TIMEOUT = 10.0


class ConnectionCount:
    """Connections this process is serving: counted at accept, uncounted at ``evt.EVT_CONN_CLOSE``."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def opened(self) -> None:
        with self._lock:
            self.value += 1

    def closed(self) -> None:
        with self._lock:
            self.value = max(0, self.value - 1)


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
    file_pool: storage.FilePool | None = None
    #: Connections being served (a busy worker lets an idle sibling accept first).
    connections: ConnectionCount = field(default_factory=ConnectionCount)


# --- the C-STORE path ------------------------------------------------------------------


class Malformed(ValueError):
    """The encoded dataset is not a well-formed DICOM data set."""


#: Top-level attributes the index needs; the fast header read keeps only these.
HEADER_TAGS = frozenset(
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "AccessionNumber", "Modality",
        "StudyDescription", "SeriesDescription", "PatientID", "PatientSex", "PatientAge", "BodyPartExamined",
        "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "NumberOfFrames",
    )
)


def check_structure(stream: bytes | memoryview, transfer_syntax: str) -> dict[int, RawDataElement]:
    """Walk every element of the encoded dataset and check each length fits exactly.

    pydicom reads truncated or over-long values silently; this walk proves
    the bytes are a complete data set before we answer success for them.
    Deflated streams are inflated first. Returns the raw top-level elements
    named in :data:`HEADER_TAGS` (little endian syntaxes only), so that the
    header need not be parsed a second time.
    """
    data = memoryview(stream)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            inflated = inflater.decompress(bytes(data), MAX_INFLATED)
        except zlib.error as exc:
            raise Malformed(f"deflate stream: {exc}") from None
        if inflater.unconsumed_tail:
            raise Malformed("deflated data set inflates beyond the limit")
        data = memoryview(inflated)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    endian = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    found: dict[int, RawDataElement] = {}
    end = _walk(data, 0, len(data), implicit, endian, delimiter=None, found=found)
    if end != len(data):
        raise Malformed("trailing bytes after the data set")
    return found


def header_dataset(encoded: bytes | Callable[[], bytes], found: dict[int, RawDataElement],
                   transfer_syntax: str) -> Dataset:
    """The header attributes as a pydicom Dataset, values decoded lazily as dcmread would.

    Built from the elements :func:`check_structure` found; big endian and
    deflated data sets are read with ``dcmread`` from ``encoded`` (the whole
    file's bytes, or a function returning them) instead.
    """
    if transfer_syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        return dcmread(BytesIO(encoded() if callable(encoded) else encoded), stop_before_pixels=True)
    # int keys: equal to, and hashed as, the BaseTags pydicom declares
    return Dataset(cast("MutableMapping[BaseTag, DataElement | RawDataElement]", found))


#: :data:`HEADER_TAGS` as plain ints: a set lookup without ``BaseTag.__eq__`` in Python.
_HEADER_INTS = frozenset(int(tag) for tag in HEADER_TAGS)
_IDENTITY_TAGS = (Tag("StudyInstanceUID"), Tag("SeriesInstanceUID"), Tag("SOPInstanceUID"), Tag("SOPClassUID"))


def _raw_identity(found: dict[int, RawDataElement]) -> InstanceIdentity | None:
    """The identity read straight from the raw UI values, or ``None`` to ask :func:`identity_of`.

    Saves pydicom's element conversion on the hot path. Only values that are
    valid UIDs once padding is stripped (as ``identity_of`` strips it) are
    taken; anything else goes the slow way, which also words the refusal.
    """
    values = []
    for tag in _IDENTITY_TAGS:
        element = found.get(tag)
        if element is None or not isinstance(element.value, bytes):
            return None
        try:
            value = element.value.decode("ascii").strip().rstrip("\x00")
        except UnicodeDecodeError:
            return None
        if not is_valid_uid(value):
            return None
        values.append(value)
    return InstanceIdentity(*values)


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_HEAD = {e: struct.Struct(e + "HHL") for e in "<>"}
_EXPLICIT_HEAD = {e: struct.Struct(e + "HH2sH") for e in "<>"}
_U32 = {e: struct.Struct(e + "L") for e in "<>"}
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD


def _walk(data: memoryview, pos: int, end: int, implicit: bool, endian: str, delimiter: int | None, depth: int = 0,
          found: dict[int, RawDataElement] | None = None) -> int:
    """Skip elements from ``pos`` to ``end`` (or to ``delimiter``); returns the position after.

    Elements whose tag is in :data:`HEADER_TAGS` are collected into ``found``.
    """
    if depth > 32:
        raise Malformed("sequences nested too deeply")
    # one unpack per element header: (group, element, length) or (group, element, VR, short length)
    head = _IMPLICIT_HEAD[endian] if implicit else _EXPLICIT_HEAD[endian]
    u32 = _U32[endian]
    while pos < end:
        if end - pos < 8:
            raise Malformed("truncated element header")
        if implicit:
            group, elem, length = head.unpack_from(data, pos)
            vr = b""
        else:
            group, elem, vr, length = head.unpack_from(data, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE:
            if tag == delimiter:
                return pos + 8
            raise Malformed(f"unexpected delimiter ({group:04X},{elem:04X})")
        if implicit:
            pos += 8
        else:
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise Malformed(f"invalid VR at ({group:04X},{elem:04X})")
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise Malformed("truncated element header")
                (length,) = u32.unpack_from(data, pos + 8)
                pos += 12
            else:
                pos += 8
        if length == _UNDEFINED:
            pos = _walk_items(data, pos, end, implicit, endian, depth)
        else:
            if pos + length > end:
                raise Malformed(f"value of ({group:04X},{elem:04X}) runs past the end")
            if found is not None and tag in _HEADER_INTS and endian == "<":
                found[tag] = RawDataElement(
                    BaseTag(tag), vr.decode() if vr else None, length, bytes(data[pos : pos + length]), pos,
                    implicit, True,
                )
            pos += length
    if delimiter is not None:
        raise Malformed("missing delimiter")
    return pos


def _walk_items(data: memoryview, pos: int, end: int, implicit: bool, endian: str, depth: int) -> int:
    """Skip the items of an undefined-length sequence or encapsulated pixel data."""
    u16 = struct.Struct(endian + "HH")
    u32 = struct.Struct(endian + "L")
    while True:
        if end - pos < 8:
            raise Malformed("undefined-length value not terminated")
        group, elem = u16.unpack_from(data, pos)
        tag = (group << 16) | elem
        (length,) = u32.unpack_from(data, pos + 4)
        pos += 8
        if tag == _SEQ_DELIM:
            return pos
        if tag != _ITEM:
            raise Malformed(f"expected an item, found ({group:04X},{elem:04X})")
        if length == _UNDEFINED:
            pos = _walk(data, pos, end, implicit, endian, _ITEM_DELIM, depth + 1)
        elif pos + length > end:
            raise Malformed("item runs past the end")
        else:
            pos += length


def handle_store(event: Event, ctx: IngestContext) -> int:
    """``evt.EVT_C_STORE``: keep the instance durably, then answer; refuse what cannot be kept."""
    started = time.perf_counter()
    calling_ae = (event.assoc.requestor.ae_title or "").strip()
    request = cast(C_STORE, event.request)  # the EVT_C_STORE handler
    transfer_syntax = str(event.context.transfer_syntax)
    sop_class = str(request.AffectedSOPClassUID or "")
    spool = dimse.take_spool(event.assoc, request.MessageID)
    try:
        if spool is not None:  # the data set went to the spool only
            if spool.broken:
                LOGGER.error("C-STORE refused 0x%04X: cannot write %s: spool write failed", STORE_FAILED,
                             _safe(request.AffectedSOPInstanceUID))
                return STORE_FAILED
            with spool.data_set() as view:
                return _store(event, ctx, view, started, calling_ae, transfer_syntax, sop_class, spool)
        # the received bytes, not copied: a view of pynetdicom's buffer, released before we answer
        with cast(BytesIO, request.DataSet).getbuffer() as view:  # a C-STORE request always has its data set
            return _store(event, ctx, view, started, calling_ae, transfer_syntax, sop_class)
    finally:
        if spool is not None:
            spool.close()  # a no-op once committed


def open_spool(ctx: IngestContext) -> dimse.SpoolOpener:
    """The listener's spool opener: a pooled file starting with the instance's Part 10 header.

    Declines (the handler then writes from memory, or refuses) when no
    pooled file is ready or the disk is near its free-space watermark.
    """

    def opener(sop_class: str, sop_instance: str, transfer_syntax: str) -> storage.Spool | None:
        if not storage.has_free_space(ctx.storage_dir, ctx.min_free_bytes, SPOOL_HEADROOM):
            return None
        spool = storage.Spool.open(ctx.file_pool, sync=ctx.sync_writes)
        if spool is not None:
            spool.head = file_meta_bytes(sop_class, sop_instance, transfer_syntax)
            spool.write(spool.head)
        return spool

    return opener


def _store(event: Event, ctx: IngestContext, view: memoryview, started: float, calling_ae: str, transfer_syntax: str,
           sop_class: str, spool: storage.Spool | None = None) -> int:
    """:func:`handle_store` on ``view``, the data set as received (and perhaps already in ``spool``)."""
    request = cast(C_STORE, event.request)  # the EVT_C_STORE handler
    size = view.nbytes
    if not storage.has_free_space(ctx.storage_dir, ctx.min_free_bytes, size):
        LOGGER.error(
            "C-STORE refused 0x%04X: free space below watermark (calling AE %s, SOP class %s, %d bytes)",
            OUT_OF_RESOURCES, calling_ae, sop_class, size,
        )
        return OUT_OF_RESOURCES

    # preamble + file meta, then the bytes as received: what event.encoded_dataset() returns, in two pieces
    meta = file_meta_bytes(sop_class, str(request.AffectedSOPInstanceUID or ""), transfer_syntax)
    chunks = (meta, view)

    def encoded() -> bytes:
        return meta + bytes(view)

    try:
        found = check_structure(view, transfer_syntax)
        ds = header_dataset(encoded, found, transfer_syntax)
    except Malformed as exc:  # our own messages name tags and offsets only
        return _refuse(ctx, chunks, CANNOT_PARSE, f"malformed data set: {exc}", calling_ae, transfer_syntax, sop_class)
    except Exception as exc:  # a parser's message may quote values (patient data): log its type only
        return _refuse(ctx, chunks, CANNOT_PARSE, f"cannot parse data set: {type(exc).__name__}",
                       calling_ae, transfer_syntax, sop_class)
    try:
        ident = _raw_identity(found) or identity_of(ds)
    except InvalidIdentity as exc:
        return _refuse(ctx, chunks, INVALID_IDENTITY, str(exc), calling_ae, transfer_syntax, sop_class)
    if ident.sop_instance_uid != str(request.AffectedSOPInstanceUID or "").strip() or ident.sop_class_uid != sop_class:
        return _refuse(ctx, chunks, IDENTITY_MISMATCH, "SOP Class/Instance UID differ from the C-STORE request",
                       calling_ae, transfer_syntax, sop_class)

    # the spool holds these very bytes, after this very header (else: copy them to a new file)
    usable = spool is not None and spool.head == meta
    try:
        stored = storage.store_instance(ctx.storage_dir, ident, chunks, sync=ctx.sync_writes, pool=ctx.file_pool,
                                        spool=spool if usable else None)
    except OSError as exc:
        LOGGER.error("C-STORE refused 0x%04X: cannot write %s: %s", STORE_FAILED, ident.sop_instance_uid, exc.strerror)
        return STORE_FAILED
    try:
        new_row = ctx.index.record(
            ds, ident, stored.path, stored.size, transfer_syntax,
            full_header=lambda: dcmread(BytesIO(encoded()), stop_before_pixels=True),
        )
    except Exception as exc:
        LOGGER.error("C-STORE refused 0x%04X: cannot index %s: %s", STORE_FAILED, ident.sop_instance_uid, type(exc).__name__)
        return STORE_FAILED

    release.note_stored(event.assoc, ident.study_uid)  # a clean release then hints the study complete
    LOGGER.debug(
        "stored %s (study %s, SOP class %s, %d bytes, %s, from %s%s%s) in %.1f ms",
        ident.sop_instance_uid, ident.study_uid, sop_class, stored.size, transfer_syntax, calling_ae,
        "" if new_row else ", duplicate", ", spooled" if usable else "", (time.perf_counter() - started) * 1000,
    )
    return SUCCESS


def _refuse(ctx: IngestContext, chunks: tuple[Any, ...], status: int, reason: str, calling_ae: str,
            transfer_syntax: str, sop_class: str) -> int:
    """Quarantine the bytes with a reason file, log without patient data, return ``status``."""
    where = "not kept"
    try:
        if storage.has_free_space(ctx.quarantine_dir, ctx.min_free_bytes, sum(memoryview(c).nbytes for c in chunks)):
            where = storage.quarantine(ctx.quarantine_dir, chunks, reason=reason, calling_ae=calling_ae,
                                       transfer_syntax=transfer_syntax, status=status, sync=ctx.sync_writes).name
    except OSError as exc:
        where = f"quarantine failed: {exc.strerror}"
    LOGGER.warning("C-STORE refused 0x%04X: %s (calling AE %s, SOP class %s, transfer syntax %s, quarantine %s)",
                   status, reason, calling_ae, _safe(sop_class), transfer_syntax, where)
    return status


def _safe(value: object) -> str:
    """Bounded printable text for a log line (exception texts may quote bytes)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))[:200]


def handle_accepted(event: Event) -> None:
    """``evt.EVT_ACCEPTED``: one line per association (calling AE and address, no patient data)."""
    requestor = event.assoc.requestor
    LOGGER.info("association accepted: calling AE %s from %s:%s", (requestor.ae_title or "").strip(),
                requestor.address, requestor.port)


def handle_closed(event: Event, ctx: IngestContext) -> None:
    """``evt.EVT_CONN_CLOSE``: drop the spool of a transfer the peer broke off; one connection fewer."""
    dimse.close_spools(event.assoc)
    ctx.connections.closed()


def handle_echo(event: Event) -> int:
    """``evt.EVT_C_ECHO``: always success."""
    return SUCCESS


# --- the application entity -----------------------------------------------------------


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with ``SO_REUSEPORT`` (N processes, one port) and a bounded TLS handshake.

    With :attr:`listen_socket` set it serves a listening socket made by the
    parent process and shared by every worker (see :func:`ingest.serve.shared_socket`):
    all workers wait on one accept queue, and a worker that is already
    serving associations waits :data:`ACCEPT_DEFER` seconds per association
    before it accepts, so that an idle sibling takes the connection first.
    """

    reuse_port = False
    listen_socket: socket.socket | None = None
    #: read by :class:`~preread.ingest.listener.transport.ListenerRequestHandler`
    spool_opener: dimse.SpoolOpener | None = None
    connections: ConnectionCount | None = None

    def server_bind(self) -> None:
        if self.listen_socket is not None:
            if self.socket is not None:
                self.socket.close()
            self.socket = self.listen_socket
            self.server_address = self.socket.getsockname()
            return
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        if self.listen_socket is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        connections: ConnectionCount | None = getattr(self, "connections", None)
        if self.listen_socket is not None and connections is not None and connections.value:
            time.sleep(min(connections.value, 8) * ACCEPT_DEFER)
        client, address = cast(socket.socket, self.socket).accept()  # shared and non-blocking: BlockingIOError if a sibling won
        if connections is not None:
            connections.opened()
        if self.ssl_context:
            client.settimeout(TLS_HANDSHAKE_TIMEOUT)
            client = self.ssl_context.wrap_socket(client, server_side=True)
            client.settimeout(None)
        return client, address


class ReusePortServerOn(ReusePortServer):
    """:class:`ReusePortServer` with ``SO_REUSEPORT`` switched on."""

    reuse_port = True


def build_ae(ae_title: str) -> AE:
    """An AE supporting Verification and every storage SOP class with :data:`TRANSFER_SYNTAXES`."""
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.maximum_pdu_size = MAX_PDU_SIZE
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def event_handlers(ctx: IngestContext, settings: Settings) -> list[Any]:
    """The listener's pynetdicom event handlers."""
    peers = access.parse_allowlist(settings.allowed_aes)
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_REQUESTED, access.handle_requested, [peers]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_CONN_CLOSE, handle_closed, [ctx]),
        (evt.EVT_RELEASED, release.handle_released, [ctx.index.engine, settings]),
        (evt.EVT_ABORTED, release.handle_aborted),
    ]


def quiet_pydicom() -> None:
    """No value validation on read, no pydicom warnings in our logs: their texts may quote patient data."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class Listener:
    """One listening process: the AE, its server thread and the stability monitor."""

    def __init__(
        self,
        settings: Settings,
        *,
        reuse_port: bool = False,
        monitor: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
    ) -> None:
        quiet_pydicom()
        self.settings = settings
        self.reuse_port = reuse_port
        #: a listening socket shared with sibling processes, used instead of binding one
        self.listen_socket = listen_socket
        self.ssl_context = ssl_context if ssl_context is not None else server_context(settings)
        url = settings.effective_database_url
        self.ctx = IngestContext(
            storage_dir=settings.storage_dir.resolve(),
            quarantine_dir=settings.quarantine_dir.resolve(),
            min_free_bytes=settings.min_free_bytes,
            # its own engine: no ping per checkout (the index retries on a dead connection itself)
            index=InstanceIndex(engine_for(url, sync_writes=settings.sync_writes, pre_ping=False)),
            sync_writes=settings.sync_writes,
        )
        self.ae = build_ae(settings.ae_title)
        self.monitor = StabilityMonitor(url, settings.stable_after) if monitor else None
        self.server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); useful with port 0."""
        if self.server is None:
            raise RuntimeError("listener not started")
        return self.server.server_address[:2]

    def start(self) -> None:
        """Bind the port, serve associations in a background thread, start the monitor."""
        self.ctx.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.ctx.file_pool is None:
            self.ctx.file_pool = storage.FilePool(self.ctx.storage_dir)
        server_class: type[ReusePortServer] = ReusePortServerOn if self.reuse_port else ReusePortServer
        if self.listen_socket is not None:
            server_class = type("SharedSocketServer", (ReusePortServer,), {"listen_socket": self.listen_socket})
        dimse.quiet_pynetdicom()
        server = cast(ReusePortServer, self.ae.make_server(  # an instance of server_class
            (self.settings.host, self.settings.port),
            ssl_context=self.ssl_context,
            evt_handlers=event_handlers(self.ctx, self.settings),
            server_class=server_class,
            request_handler=dimse.ListenerRequestHandler,
        ))
        server.spool_opener = open_spool(self.ctx)
        server.connections = self.ctx.connections
        self.server = server
        self.ae._servers.append(self.server)  # so AE.shutdown() and server.shutdown() know it
        self._thread = threading.Thread(target=self.server.serve_forever, name="preread-listener", daemon=True)
        self._thread.start()
        if self.monitor is not None:
            self.monitor.start()
        threading.Thread(target=self._sweep, name="preread-sweep", daemon=True).start()
        host, port = self.address
        LOGGER.info("listening as %s on %s:%d%s", self.settings.ae_title, host, port, " (TLS)" if self.ssl_context else "")

    def _sweep(self) -> None:
        """Remove temporary files a killed process left behind (in the background: a big store takes a while)."""
        try:
            removed = storage.sweep_temporary(self.ctx.storage_dir) + storage.sweep_temporary(self.ctx.quarantine_dir)
        except OSError as exc:
            LOGGER.warning("temporary file sweep failed: %s", exc.strerror)
            return
        if removed:
            LOGGER.info("removed %d stale temporary files", removed)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running associations finish (bounded), stop the monitor."""
        if self.server is not None:
            self.server.shutdown()
            deadline = time.monotonic() + timeout
            while self.server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self.server.active_associations:
                assoc.abort()
            self.server = None
        if self.monitor is not None:
            self.monitor.stop()
        if self.ctx.file_pool is not None:
            self.ctx.file_pool.close()
            self.ctx.file_pool = None

    def wait(self) -> None:
        """Block until the server thread ends."""
        if self._thread is not None:
            self._thread.join()



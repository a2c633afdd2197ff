"""Every extension of pynetdicom beyond its documented API, in one place.

pynetdicom is pinned to the exact version this was written against
(``pyproject.toml``); ``tests/listener/test_transport_pin.py`` fails, naming
this module, if the internals used here change. What is used:

* :class:`ListenerRequestHandler` overrides ``RequestHandler.handle`` and the
  private ``RequestHandler._create_association``: before pynetdicom makes an
  association, the connection passes :mod:`~preread.ingest.listener.gate`
  (TLS handshake and A-ASSOCIATE-RQ within a short timeout, per-address and
  association limits, AE titles, free space); only then is an association
  created, given the request already read, and run to its end on the
  connection's thread, so that its slot is released the moment it closes.
* :class:`ListenerSocket` replaces the class of the live
  ``AssociationSocket`` pynetdicom made: it first replays the request the
  gate read, then reads each PDU into a buffer that grows as bytes arrive
  (never sized from the length the peer declares) and answers a PDU longer
  than the maximum we advertised with A-ABORT.
* :class:`ListenerDIMSE` replaces ``assoc.dimse`` (a ``DIMSEServiceProvider``
  subclass) and
  - writes a C-STORE's data set fragments to a :class:`~preread.ingest.storage.spool.Spool`
    as they arrive, or, when the first fragment finds the disk below its
    watermark (or the request without a SOP Instance UID), drops every
    fragment and lets the handler answer the refusal: a data set is never
    held in memory twice, nor at all when it is refused;
  - answers a C-STORE-RQ that pynetdicom would silently drop (no valid
    Affected SOP Instance UID) with a failure status;
  - encodes a plain C-STORE-RSP (PS3.7 9.3.1.2) directly in Little Endian
    Implicit VR, byte for byte what pynetdicom's own encoder gives;
* :class:`ListenerServer` (a ``ThreadedAssociationServer`` passed to
  ``AE.make_server(server_class=...)``) accepts without doing anything else
  on the accept thread (no TLS there), with a listen backlog of
  :data:`LISTEN_BACKLOG`, and can serve a listening socket shared by
  sibling processes;
* :class:`ListenerServer` hands every association the same supported presentation
  contexts (:class:`SharedContexts`, one snapshot taken when the server is made)
  where pynetdicom deep-copies ~170 contexts and ~2,200 transfer syntax UIDs
  per association (tens of milliseconds of CPU per association, and an archive
  sweep's C-MOVE opens one per study); negotiation only reads them;
* :meth:`ListenerServer.service_actions` replaces pynetdicom's ``gc.collect()`` every 60 accepts
  (several a second under a connection flood) by one every :data:`GC_INTERVAL` seconds;
* :func:`quiet_pynetdicom` sets ``_config.LOG_HANDLER_LEVEL`` to skip
  pynetdicom's per-PDU debug handlers;
* :func:`memoize_uid_checks` remembers the verdicts of the two UID checks
  pynetdicom runs on every UID of an A-ASSOCIATE-RQ (``_config.VALIDATORS["UI"]``
  and pydicom's ``UID.is_valid``, a regular expression each time): a PACS
  moving one study proposes over a hundred presentation contexts with several
  transfer syntaxes each, the same ones association after association.

Association negotiation, the state machine and the service classes are pynetdicom's.
"""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from preread.ingest.assembly.catalog import uid_value
from preread.ingest.listener import gate
from preread.ingest.listener.statuses import StoreStatus
from preread.ingest.storage.spool import Spool
from preread.ingest.storage.part10 import ui_bytes

LOGGER = logging.getLogger("preread.ingest.listener")

#: Opens a spool for (SOP Class UID, SOP Instance UID, transfer syntax UID), declines with ``None`` (the data
#: set then arrives in memory), or refuses with the status to answer (its fragments are then dropped).
SpoolOpener = Callable[[str, str, str], "Spool | StoreStatus | None"]

#: Command Field of a C-STORE-RSP (PS3.7 Table E.1-1).
C_STORE_RSP_FIELD = 0x8001
#: Command Data Set Type: no data set follows.
NO_DATA_SET = 0x0101
#: Message Control Header of the last (only) fragment of a command (PS3.8 E.2).
LAST_COMMAND_FRAGMENT = b"\x03"
#: Listen backlog: bursts of modalities connecting at once wait in the kernel, not on SYN retries.
LISTEN_BACKLOG = 512
#: Connections waiting for their A-ASSOCIATE-RQ at once (beyond: the longest waiting is closed).
MAX_WAITING = 256
#: Seconds a worker sharing the listening socket waits, per connection it holds, before accepting another.
ACCEPT_DEFER = 0.025
#: Least seconds between the server's garbage collections (pynetdicom: every 60 accepts).
GC_INTERVAL = 30.0
#: Largest command set accepted (real ones are a few hundred bytes).
MAX_COMMAND_SET = 64 * 1024
#: A-ABORT: source service-provider, reason invalid-PDU-parameter value (PS3.8 9.3.8).
_ABORT_PDU = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)
#: First size of a PDU read buffer; it doubles as bytes arrive.
_FIRST_BUFFER = 64 * 1024


def quiet_pynetdicom() -> None:
    """No standard PDU/DIMSE debug handlers on new associations (the listener keeps pynetdicom at WARNING)."""
    _config.LOG_HANDLER_LEVEL = "none"


#: UIDs whose check verdicts are remembered (a few hundred distinct ones occur in practice).
UID_MEMO = 4096


def memoize_uid_checks() -> None:
    """Remember UID check verdicts (pure functions of the text) instead of re-running them per UID per association.

    ``_config.VALIDATORS["UI"]`` is pynetdicom's documented hook; ``UID.is_valid``
    is replaced on pydicom's class by a property giving the same answer from a
    bounded cache. Idempotent.
    """
    validate = _config.VALIDATORS["UI"]
    if not getattr(validate, "memoized", False):
        remembered = functools.lru_cache(maxsize=UID_MEMO)(lambda text, enforce: validate(text))

        def validate_ui(value: Any) -> tuple[bool, str]:
            if not isinstance(value, str):
                return validate(value)
            return remembered(value, _config.ENFORCE_UID_CONFORMANCE)

        validate_ui.memoized = True  # type: ignore[attr-defined]
        _config.VALIDATORS["UI"] = validate_ui
    current = inspect.getattr_static(UID, "is_valid")
    if isinstance(current, property) and not getattr(current.fget, "memoized", False):
        valid = functools.lru_cache(maxsize=UID_MEMO)(current.fget)  # type: ignore[arg-type]

        def is_valid(self: UID) -> bool:
            return bool(valid(str(self)))

        is_valid.memoized = True  # type: ignore[attr-defined]
        UID.is_valid = property(is_valid)  # type: ignore[method-assign,assignment]


def peer_of(assoc: Any) -> str:
    """``address:port`` of the association's peer, for log lines."""
    requestor = assoc.requestor
    return f"{requestor.address}:{requestor.port}"


class ListenerSocket(AssociationSocket):
    """An :class:`AssociationSocket` that replays the gate's request and reads bounded, growing PDUs."""

    #: bytes already read from the peer (the A-ASSOCIATE-RQ), served before the socket's
    prefix: bytes = b""

    @property
    def ready(self) -> bool:
        return bool(self.prefix) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closes the connection, or after an A-ABORT)."""
        if self.prefix:
            head, self.prefix = self.prefix[:nr_bytes], self.prefix[nr_bytes:]
            return bytearray(head)
        sock = self.socket
        if sock is None:
            return bytearray()
        limit = self.assoc.acceptor.maximum_length or gate.MAX_REQUEST_PDU
        if nr_bytes > limit:
            self.abort(f"PDU of {nr_bytes} bytes exceeds the negotiated maximum of {limit}")
            return bytearray()
        buffer = bytearray(min(nr_bytes, _FIRST_BUFFER))
        read = 0
        while read < nr_bytes:
            if read == len(buffer):  # grow as bytes arrive: at most twice what was received
                buffer.extend(bytes(min(len(buffer), nr_bytes - len(buffer))))
            with memoryview(buffer) as view:
                count = sock.recv_into(view[read:], len(buffer) - read)
            if not count:  # closed by the peer: what we have, as AssociationSocket.recv does
                del buffer[read:]
                return buffer
            read += count
        return buffer

    def abort(self, why: str) -> None:
        """Send A-ABORT and shut the connection (on the DUL thread, which alone sends on this socket)."""
        LOGGER.warning("association from %s aborted: %s", peer_of(self.assoc), why)
        sock = self.socket
        try:
            sock.sendall(_ABORT_PDU)  # type: ignore[union-attr]
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        except OSError:
            pass


def _element(tag: int, value: bytes) -> bytes:
    """One Little Endian Implicit VR element (the command set's encoding, PS3.7 6.3.1)."""
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def encode_c_store_rsp(primitive: C_STORE) -> bytes | None:
    """The command set of a plain C-STORE-RSP, or ``None`` when pynetdicom must encode it.

    Plain means: a status, the message ID responded to and the affected SOP
    UIDs (each optional), without Offending Element or Error Comment.
    """
    if (
        primitive.Status is None
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.OffendingElement is not None
        or primitive.ErrorComment is not None
    ):
        return None
    try:
        parts = []
        if primitive.AffectedSOPClassUID is not None:
            parts.append(_element(0x00000002, ui_bytes(str(primitive.AffectedSOPClassUID))))
        parts.append(_element(0x00000100, struct.pack("<H", C_STORE_RSP_FIELD)))
        parts.append(_element(0x00000120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)))
        parts.append(_element(0x00000800, struct.pack("<H", NO_DATA_SET)))
        parts.append(_element(0x00000900, struct.pack("<H", primitive.Status)))
        if primitive.AffectedSOPInstanceUID is not None:
            parts.append(_element(0x00001000, ui_bytes(str(primitive.AffectedSOPInstanceUID))))
    except (UnicodeEncodeError, struct.error):
        return None
    body = b"".join(parts)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


class ListenerDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider that spools (or refuses) C-STORE data sets as they arrive,
    answers requests pynetdicom would drop, and encodes C-STORE responses directly."""

    def __init__(self, assoc: Any, opener: SpoolOpener | None = None) -> None:
        super().__init__(assoc)
        self.opener = opener
        #: the message whose data set is arriving, and where it goes (``None``: memory; a status: dropped)
        self._message: DIMSEMessage | None = None
        self._spool: Spool | StoreStatus | None = None
        self._command_bytes = 0
        #: outcomes of complete messages by Message ID, until the handler takes them
        self._complete: dict[int, Spool | StoreStatus] = {}
        self._lock = threading.Lock()
        self._syntaxes: dict[int, str] | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Spool or drop the data set fragments of ``primitive``, then let pynetdicom decode the rest.

        A fragment that went to a spool (or was refused) reaches pynetdicom as
        its control header alone: the data set then lives once, in the page
        cache, or nowhere.
        """
        items = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(items):
            if data[0] & 1:  # a command fragment (PS3.8 E.2): bounded, it is decoded in memory
                self._command_bytes += len(data)
                if self._command_bytes > MAX_COMMAND_SET:
                    sock = self.dul.socket
                    if isinstance(sock, ListenerSocket):
                        sock.abort(f"command set longer than {MAX_COMMAND_SET} bytes")
                        return
            elif self.opener is not None and self._take_fragment(context_id, data):
                items[index] = (context_id, data[:1])
        super().receive_primitive(primitive)
        if self.message is None:  # the message is complete
            self._command_bytes = 0
            if self._message is not None:
                self._finish()

    def _take_fragment(self, context_id: int, data: bytes) -> bool:
        """Spool (or drop) one data set fragment of the current message; whether pynetdicom is spared it."""
        message = self.message
        if message is None:
            return False
        if message is not self._message:  # the first data set fragment of a new message
            self._discard()
            self._message = message
            self._spool = self._open(message, context_id)
        target = self._spool
        if target is None:
            return False
        if isinstance(target, Spool):
            target.write(memoryview(data)[1:])
        return True

    def _open(self, message: DIMSEMessage, context_id: int) -> Spool | StoreStatus | None:
        """Where a C-STORE-RQ's data set that starts now goes: a spool, memory (``None``) or nowhere (a status)."""
        if not isinstance(message, C_STORE_RQ) or message.data_set.tell():  # type: ignore[union-attr]
            return None
        command = message.command_set
        if self._syntaxes is None:
            self._syntaxes = {cx.context_id: str(cx.transfer_syntax[0]) for cx in self.assoc.accepted_contexts
                              if cx.context_id is not None}
        syntax = self._syntaxes.get(context_id)
        try:
            sop_class = str(command.get("AffectedSOPClassUID") or "")
            sop_instance = uid_value(command.get("AffectedSOPInstanceUID"))
        except Exception:  # an odd command set: pynetdicom will judge it
            return None
        if sop_instance is None:
            return StoreStatus.CANNOT_UNDERSTAND_INVALID_REQUEST
        if syntax is None or not sop_class:
            return None
        return self.opener(sop_class, sop_instance, syntax)  # type: ignore[misc]

    def _finish(self) -> None:
        message, target = self._message, self._spool
        self._message = self._spool = None
        if target is None or message is None:
            return
        try:
            message_id = int(message.command_set.MessageID)
        except Exception:
            if isinstance(target, Spool):
                target.close()
            return
        with self._lock:
            # one message at a time per association: an untaken older outcome is stale
            stale = list(self._complete.values())
            self._complete = {message_id: target}
        for old in stale:
            if isinstance(old, Spool):
                old.close()

    def _discard(self) -> None:
        if isinstance(self._spool, Spool):
            self._spool.close()
        self._message = self._spool = None

    def take_spool(self, message_id: int) -> Spool | StoreStatus | None:
        """What became of C-STORE-RQ ``message_id``'s data set: its spool (the caller commits or closes
        it), the status it was refused with, or ``None`` (it is in the request, in memory)."""
        with self._lock:
            return self._complete.pop(message_id, None)

    def close_spools(self) -> None:
        """Drop every spool (the connection closed)."""
        with self._lock:
            targets = list(self._complete.values())
            self._complete = {}
        self._discard()
        for target in targets:
            if isinstance(target, Spool):
                target.close()

    def get_msg(self, block: bool = False) -> Any:
        """The next message for the association; a C-STORE-RQ pynetdicom would drop unanswered
        (missing Affected SOP Instance UID) is answered with a failure status here instead."""
        context_id, msg = super().get_msg(block)
        if isinstance(msg, C_STORE) and context_id is not None and msg.MessageIDBeingRespondedTo is None \
                and not msg.is_valid_request:
            status = StoreStatus.CANNOT_UNDERSTAND_INVALID_REQUEST
            if msg.MessageID is None:
                LOGGER.warning("association from %s aborted: C-STORE request without a Message ID",
                               peer_of(self.assoc))
                self.assoc.abort()
                return None, None
            taken = self.take_spool(msg.MessageID)
            if isinstance(taken, Spool):
                taken.close()
            LOGGER.warning("C-STORE refused %s: request lacks a valid Affected SOP Instance UID (from %s)",
                           status, peer_of(self.assoc))
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            rsp.Status = int(status)
            self.send_msg(rsp, context_id)
            return None, None
        return context_id, msg

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send ``primitive``; a plain C-STORE-RSP skips pydicom's Dataset encoding."""
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            command = encode_c_store_rsp(primitive)
            max_length = self.maximum_pdu_size
            # one PDV item: 4 bytes length, context ID, control header, command (PS3.8 9.3.5.1)
            if command is not None and (max_length == 0 or len(command) + 6 <= max_length):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


def take_spool(assoc: Any, message_id: int | None) -> Spool | StoreStatus | None:
    """What became of C-STORE ``message_id``'s data set (see :meth:`ListenerDIMSE.take_spool`)."""
    dimse = getattr(assoc, "dimse", None)
    if not isinstance(dimse, ListenerDIMSE) or message_id is None:
        return None
    return dimse.take_spool(int(message_id))


def close_spools(assoc: Any) -> None:
    """Drop the association's spools (``evt.EVT_CONN_CLOSE``)."""
    dimse = getattr(assoc, "dimse", None)
    if isinstance(dimse, ListenerDIMSE):
        dimse.close_spools()


#: Judges an association request from an address: ``None`` admits it.
Judge = Callable[[gate.AssociationRequest, str], "gate.Rejection | None"]


class SharedContexts(list[Any]):
    """The server's supported presentation contexts; ``deepcopy`` gives a shallow copy.

    pynetdicom's ``RequestHandler._create_association`` deep-copies the
    server's contexts into every association; negotiation
    (``negotiate_as_acceptor``) only reads them, building new result contexts,
    and nothing changes this snapshot once the server is made.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose connections pass the gate before they become associations.

    The accept thread only accepts and counts (per-address cap); TLS, the
    request and the association run on the connection's own thread. With
    :attr:`listen_socket` set it serves a listening socket made by the
    parent process and shared by every worker (see
    :func:`~preread.ingest.listener.serving.shared_socket`): a worker already
    holding connections waits :data:`ACCEPT_DEFER` seconds per connection
    before it accepts, so that an idle sibling takes the connection first.
    """

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, door: gate.Door, judge: Judge | None = None, request_timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None, spool_opener: SpoolOpener | None = None,
                 listen_socket: socket.socket | None = None, reuse_port: bool = False, **kwargs: Any) -> None:
        """``AE.make_server(..., server_class=ListenerServer, door=..., ...)`` passes these keywords."""
        self.door = door
        self.judge = judge
        self.request_timeout = request_timeout
        #: TLS is the gate's job, on each connection's thread (pynetdicom would handshake on the accept thread)
        self.tls = tls
        self.spool_opener = spool_opener
        self.listen_socket = listen_socket
        self.reuse_port = reuse_port
        self._tickets: dict[int, gate.Ticket] = {}
        self._tickets_lock = threading.Lock()
        self._last_gc = time.monotonic()
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(copy.deepcopy(self.contexts))

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.listen_socket is not None:
            self.socket.close()
            self.socket = self.listen_socket
            self.server_address = self.socket.getsockname()
            return
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        if self.listen_socket is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; nothing else happens on the accept thread."""
        assert self.socket is not None
        held = self.door.connections
        if self.listen_socket is not None and held:
            time.sleep(min(held, 8) * ACCEPT_DEFER)
        return self.socket.accept()  # shared and non-blocking: BlockingIOError if a sibling won

    def process_request(self, request: Any, client_address: Any) -> None:
        """Count the connection against its address's cap, then serve it on its own thread."""
        address = str(client_address[0])
        ticket = self.door.enter(address, request)
        if ticket is None:
            if gate.THROTTLE.allow(("cap", address)):
                LOGGER.warning("connection from %s refused: connection limit reached (%d per address)",
                               address, self.door.per_address)
            gate.close(request)
            return
        with self._tickets_lock:
            self._tickets[id(request)] = ticket
        super().process_request(request, client_address)

    def service_actions(self) -> None:
        """pynetdicom runs a full ``gc.collect()`` every 60 accepts; under a connection flood that is several
        per second on the accept thread. Here: at most one per :data:`GC_INTERVAL` seconds."""
        now = time.monotonic()
        if now - self._last_gc >= GC_INTERVAL:
            self._last_gc = now
            gc.collect()

    def take_ticket(self, request: Any) -> gate.Ticket:
        with self._tickets_lock:
            return self._tickets.pop(id(request))

    def shutdown(self) -> None:
        """Stop serving and close the socket (the server was made, not started, by the AE: it is not in
        the AE's server list, which pynetdicom's ``shutdown`` would edit)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class ListenerRequestHandler(RequestHandler):
    """A connection: the gate first, then (if it passes) a pynetdicom association, served to its end."""

    server: ListenerServer

    def handle(self) -> None:
        server = self.server
        ticket = server.take_ticket(self.request)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        deadline = ticket.accepted_at + server.request_timeout
        sock = self.request
        try:
            if server.tls is not None:
                sock = gate.tls_handshake(sock, server.tls, deadline)
                server.door.rewrap(ticket, sock)
                self.request = sock
            request = gate.read_request(sock, deadline)
            rejection = server.judge(request, ticket.address) if server.judge is not None else None
            if rejection is None and not server.door.admit(ticket):
                rejection = gate.local_limit(f"association limit reached ({server.door.max_associations})")
            if rejection is not None:
                LOGGER.warning("association from %s rejected: %s (calling AE %s, called AE %s)", peer,
                               rejection.event, gate.printable(request.calling_ae), gate.printable(request.called_ae))
                server.door.leave(ticket)
                gate.send_and_close(sock, rejection.pdu())
                return
            sock.settimeout(None)
        except gate.Refused as exc:
            if gate.THROTTLE.allow((exc.event, ticket.address)):
                LOGGER.warning("connection from %s closed: %s", peer, exc.event)
            server.door.leave(ticket)
            gate.close(sock)
            return
        assoc = None
        try:
            assoc = self._create_association()
            assoc.dul.socket.prefix = request.pdu
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
            if assoc.dul.idle_timer_expired():
                LOGGER.warning("association from %s aborted: idle timeout (%s s without a PDU)", peer,
                               assoc.network_timeout)
        finally:
            if assoc is not None:
                close_spools(assoc)
            server.door.leave(ticket)
            gate.close(sock)

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dimse = ListenerDIMSE(assoc, self.server.spool_opener)
        # the socket pynetdicom made for this connection, with our recv
        assoc.dul.socket.__class__ = ListenerSocket
        return assoc


def no_delay(event: Any) -> None:
    """``evt.EVT_CONN_OPEN`` on an association we request: send small PDUs at once (TCP_NODELAY).

    A C-FIND or C-MOVE request is a command and an identifier in two small
    P-DATA writes; with Nagle's algorithm the second waits for the peer's
    delayed ACK (tens of milliseconds per request). Used by archive sweeps.
    """
    sock = getattr(getattr(getattr(event.assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


#: Seconds the reactor must stay parked before a request goes out on a reused association.
_PARKED_FOR = 0.001


def park_reactor(assoc: Any, timeout: float = 2.0) -> None:
    """Before a ``send_c_*`` on an association we requested and reuse: make sure its reactor is parked.

    pynetdicom pauses the association's reactor thread before sending a
    request, but checks only a flag the reactor sets just *before* it blocks;
    a reactor caught between that flag and its wait can take the peer's first
    response off the queue ("Received unexpected C-FIND service message"),
    which a fast peer makes likely when several requests follow one another
    (an archive sweep's series and image queries and its C-MOVE). Here the
    reactor is paused and seen paused twice, a millisecond apart.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None:
        return
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if getattr(assoc, "_is_paused", True):
            time.sleep(_PARKED_FOR)
            if getattr(assoc, "_is_paused", True):
                return
        else:
            time.sleep(0.0001)

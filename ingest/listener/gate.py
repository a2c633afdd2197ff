"""The door of the listener: what a connection must do before it holds an association slot.

A connection is accepted at once (the accept thread does nothing else), then,
on its own thread, must finish its TLS handshake and send a well-formed
A-ASSOCIATE-RQ of at most :data:`MAX_REQUEST_PDU` bytes within
``PREREAD_ASSOCIATION_REQUEST_TIMEOUT`` seconds of being accepted. The
request is judged here, from its fixed fields, before pynetdicom sees it:
calling AE (the ``PREREAD_ALLOWED_AES`` allowlist), called AE, free space and
the association limit; a refusal is an A-ASSOCIATE-RJ with the standard's
reason. Only a request that passes becomes a pynetdicom association.

Each peer address may hold ``PREREAD_MAX_CONNECTIONS_PER_ADDRESS``
connections; connections still waiting for their request are bounded too,
the oldest closed first, so that idle or closed sockets cannot lock an
allowed caller out. Every refusal is logged with the peer address and the
event, never with bytes the peer sent.

This module is plain DICOM Upper Layer over sockets (PS3.8 9.3); it uses no
pynetdicom internals.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from enum import IntEnum

LOGGER = logging.getLogger("preread.ingest.listener")

#: Longest A-ASSOCIATE-RQ accepted (its PDU length field; real requests are a few hundred bytes).
MAX_REQUEST_PDU = 64 * 1024
#: PDU type of an A-ASSOCIATE-RQ (PS3.8 9.3.2).
A_ASSOCIATE_RQ = 0x01
#: Bytes of the A-ASSOCIATE-RQ before its variable items: header 6, version 2, reserved 2, AE titles 32, reserved 32.
_FIXED_RQ = 74
#: Smallest buffer a read starts with; it grows as bytes arrive.
_FIRST_BUFFER = 4096


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 9.3.4)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. for the sources above that we use (PS3.8 9.3.4)."""

    CALLING_AE_NOT_RECOGNISED = 0x03  # source service-user
    CALLED_AE_NOT_RECOGNISED = 0x07  # source service-user
    LOCAL_LIMIT_EXCEEDED = 0x02  # source service-provider (presentation)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused: the A-ASSOCIATE-RJ fields and the log's words."""

    result: RejectResult
    source: RejectSource
    reason: RejectReason
    event: str

    def pdu(self) -> bytes:
        """The A-ASSOCIATE-RJ PDU."""
        return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, self.result, self.source, self.reason)


def rejected_calling_ae() -> Rejection:
    return Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLING_AE_NOT_RECOGNISED,
                     "calling AE not allowed")


def rejected_called_ae() -> Rejection:
    return Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLED_AE_NOT_RECOGNISED,
                     "called AE not recognised")


def local_limit(event: str) -> Rejection:
    return Rejection(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                     RejectReason.LOCAL_LIMIT_EXCEEDED, event)


class Refused(Exception):
    """The connection is closed without an association; ``event`` says why (for the log)."""

    def __init__(self, event: str) -> None:
        super().__init__(event)
        self.event = event


@dataclass(frozen=True, slots=True)
class AssociationRequest:
    """An A-ASSOCIATE-RQ as received: its PDU bytes and the AE titles from its fixed fields."""

    pdu: bytes
    called_ae: str
    calling_ae: str


def _title(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip(" \x00")


def read_request(sock: socket.socket, deadline: float) -> AssociationRequest:
    """Read one A-ASSOCIATE-RQ PDU by ``deadline`` (``time.monotonic``); :class:`Refused` otherwise.

    Reads exactly that PDU, so whatever the peer sent after it stays in the
    socket for the association. The buffer grows as bytes arrive.
    """
    header = _read_exactly(sock, 6, deadline, "connection closed before an association request")
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != A_ASSOCIATE_RQ:
        raise Refused(f"first PDU is not an association request (type 0x{pdu_type:02X})")
    if length > MAX_REQUEST_PDU:
        raise Refused(f"association request of {length} bytes exceeds {MAX_REQUEST_PDU}")
    if length < _FIXED_RQ - 6:
        raise Refused(f"association request of {length} bytes is too short")
    body = _read_exactly(sock, length, deadline, "connection closed inside the association request")
    pdu = header + body
    return AssociationRequest(pdu, called_ae=_title(pdu[10:26]), calling_ae=_title(pdu[26:42]))


def _read_exactly(sock: socket.socket, count: int, deadline: float, closed: str) -> bytes:
    buffer = bytearray(min(count, _FIRST_BUFFER))
    read = 0
    while read < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused("association request timeout")
        if read == len(buffer):
            buffer.extend(bytes(min(len(buffer), count - len(buffer))))  # double, up to what is still due
        sock.settimeout(remaining)
        try:
            with memoryview(buffer) as view:
                got = sock.recv_into(view[read:], len(buffer) - read)
        except (TimeoutError, socket.timeout):
            raise Refused("association request timeout") from None
        except OSError as exc:
            raise Refused(f"{closed} ({exc.__class__.__name__})") from None
        if not got:
            raise Refused(closed)
        read += got
    return bytes(buffer)


def send_and_close(sock: socket.socket, data: bytes, linger: float = 1.0) -> None:
    """Send ``data``, then close after the peer does (or ``linger`` seconds), so that it reads our answer."""
    try:
        sock.settimeout(linger)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        drained, end = 0, time.monotonic() + linger
        while drained < (1 << 20) and time.monotonic() < end:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except (OSError, ValueError):
        pass
    finally:
        close(sock)


def close(sock: socket.socket) -> None:
    """Shut down and close, ignoring a socket that is already gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
    try:
        sock.close()
    except OSError:
        pass


def tls_handshake(sock: socket.socket, context: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
    """Wrap ``sock`` and finish the server handshake by ``deadline``; :class:`Refused` otherwise."""
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        return context.wrap_socket(sock, server_side=True)
    except (TimeoutError, socket.timeout):
        raise Refused("TLS handshake failed: timeout") from None
    except ssl.SSLError as exc:
        raise Refused(f"TLS handshake failed: {exc.reason or exc.__class__.__name__}") from None
    except OSError as exc:
        raise Refused(f"TLS handshake failed: {exc.__class__.__name__}") from None


class Ticket:
    """One counted connection: its peer address and the socket its thread reads (replaced after TLS)."""

    __slots__ = ("address", "sock", "admitted", "accepted_at")

    def __init__(self, address: str, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.admitted = False
        #: ``time.monotonic()`` at accept: the request timeout counts from here
        self.accepted_at = time.monotonic()


class Door:
    """Who holds a connection: counts per peer address, the connections still waiting for a
    request, and the association slots. Thread-safe; shared by the accept and connection threads."""

    def __init__(self, per_address: int, max_waiting: int, max_associations: int) -> None:
        self.per_address = per_address
        self.max_waiting = max_waiting
        self.max_associations = max_associations
        self._lock = threading.Lock()
        self._by_address: Counter[str] = Counter()
        self._waiting: OrderedDict[int, Ticket] = OrderedDict()
        self._associations = 0

    @property
    def connections(self) -> int:
        """Connections held now (waiting or associated)."""
        with self._lock:
            return sum(self._by_address.values())

    @property
    def associations(self) -> int:
        """Association slots held now."""
        with self._lock:
            return self._associations

    def enter(self, address: str, sock: socket.socket) -> Ticket | None:
        """Count a new connection; ``None`` (not counted) when its address is at its cap.

        When too many connections wait for their request, the one waiting
        longest is shut down to make room (its thread then refuses it).
        """
        ticket = Ticket(address, sock)
        with self._lock:
            if self._by_address[address] >= self.per_address:
                return None
            self._by_address[address] += 1
            self._waiting[id(ticket)] = ticket
            while len(self._waiting) > self.max_waiting:
                _, oldest = self._waiting.popitem(last=False)
                try:  # under the lock: its thread closes the socket only after leave()
                    oldest.sock.shutdown(socket.SHUT_RDWR)
                except (OSError, ValueError):
                    pass
        return ticket

    def rewrap(self, ticket: Ticket, sock: socket.socket) -> None:
        """The connection's socket is now ``sock`` (after the TLS handshake)."""
        with self._lock:
            ticket.sock = sock

    def admit(self, ticket: Ticket) -> bool:
        """The connection sent its request: it takes an association slot; ``False`` when none is free."""
        with self._lock:
            self._waiting.pop(id(ticket), None)
            if self._associations >= self.max_associations:
                return False
            self._associations += 1
            ticket.admitted = True
            return True

    def leave(self, ticket: Ticket) -> None:
        """The connection is done (call before closing its socket): release its count and slot."""
        with self._lock:
            self._waiting.pop(id(ticket), None)
            self._by_address[ticket.address] -= 1
            if self._by_address[ticket.address] <= 0:
                del self._by_address[ticket.address]
            if ticket.admitted:
                self._associations -= 1
                ticket.admitted = False


def printable(text: str) -> str:
    """Bounded printable text for a log line (an AE title is what the peer sent)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:32]


class Throttle:
    """At most one log line per key (event, address) per ``interval`` seconds: a flood of refused
    connections must not flood the log."""

    def __init__(self, interval: float = 10.0, size: int = 4096) -> None:
        self.interval = interval
        self.size = size
        self._last: OrderedDict[object, float] = OrderedDict()
        self._suppressed: Counter[object] = Counter()
        self._lock = threading.Lock()

    def allow(self, key: object) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] += 1
                return False
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > self.size:
                old, _ = self._last.popitem(last=False)
                self._suppressed.pop(old, None)
            return True


#: The listener's log throttle.
THROTTLE = Throttle()

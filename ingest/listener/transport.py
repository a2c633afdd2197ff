"""Lean pynetdicom plumbing for the listener's C-STORE hot path.

pynetdicom spends most of a C-STORE's CPU outside the handler: it reads
each PDU in 4 KiB ``recv`` calls, and it builds every C-STORE response as a
pydicom Dataset, validates and encodes it. On one association that CPU is
latency, and on two cores it is what caps several associations. The
listener's associations therefore use

* :class:`ListenerSocket`, which reads a PDU with ``recv_into`` straight
  into one buffer of its full length, and
* :class:`ListenerDIMSE`, which
  - writes a C-STORE's data set fragments to a :class:`~ingest.storage.Spool`
    as they arrive (in the reader thread), so that the disk is busy with an
    instance while the rest of it is still on the wire; the C-STORE handler
    takes the spool (:func:`take_spool`) and commits it, or writes from
    memory when there is none;
  - encodes a plain C-STORE-RSP (PS3.7 9.3.1.2) directly in Little Endian
    Implicit VR, byte for byte what pynetdicom's own encoder gives (a test
    holds it to that); a response with an error comment or an offending
    element goes through pynetdicom;

and :func:`quiet_pynetdicom` switches off pynetdicom's standard per-PDU
debug handlers (``_config.LOG_HANDLER_LEVEL``), whose work costs a
C-STORE as much as our own and which the listener never logs.

Everything else, association negotiation, the state machine and the
service class, is pynetdicom's.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from preread.ingest.storage.files import Spool
from preread.ingest.storage.part10 import ui_bytes

#: Opens a spool for (SOP Class UID, SOP Instance UID, transfer syntax UID), or declines with ``None``.
SpoolOpener = Callable[[str, str, str], "Spool | None"]

#: Command Field of a C-STORE-RSP (PS3.7 Table E.1-1).
C_STORE_RSP_FIELD = 0x8001
#: Command Data Set Type: no data set follows.
NO_DATA_SET = 0x0101
#: Message Control Header of the last (only) fragment of a command (PS3.8 E.2).
LAST_COMMAND_FRAGMENT = b"\x03"


def quiet_pynetdicom() -> None:
    """No standard PDU/DIMSE debug handlers on new associations (the listener keeps pynetdicom at WARNING)."""
    _config.LOG_HANDLER_LEVEL = "none"


class ListenerSocket(AssociationSocket):
    """An :class:`AssociationSocket` that reads with ``recv_into`` into one buffer per read."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closes the connection)."""
        sock = self.socket
        if sock is None:
            return bytearray()
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            count = sock.recv_into(view[read:], nr_bytes - read)
            if not count:  # closed by the peer: what we have, as AssociationSocket.recv does
                view.release()
                del buffer[read:]
                return buffer
            read += count
        view.release()
        return buffer


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
    """pynetdicom's DIMSE provider that spools C-STORE data sets and encodes C-STORE responses directly."""

    def __init__(self, assoc: Any, opener: SpoolOpener | None = None) -> None:
        super().__init__(assoc)
        self.opener = opener
        #: the message whose data set is arriving, and its spool (``None``: not spooled)
        self._message: DIMSEMessage | None = None
        self._spool: Spool | None = None
        #: spools of complete messages by Message ID, until the handler takes them
        self._complete: dict[int, Spool] = {}
        self._lock = threading.Lock()
        self._syntaxes: dict[int, str] | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Spool the data set fragments of ``primitive``, then let pynetdicom decode the rest.

        A fragment that went to a spool reaches pynetdicom as its control
        header alone: the data set then lives once, in the page cache, and
        the handler reads it from the spool.
        """
        if self.opener is not None:
            items = primitive.presentation_data_value_list
            for index, (context_id, data) in enumerate(items):
                if not data[0] & 1 and self._spool_fragment(context_id, data):  # a data set fragment (PS3.8 E.2)
                    items[index] = (context_id, data[:1])
        super().receive_primitive(primitive)
        if self._message is not None and self.message is not self._message:  # the message is complete
            self._finish()

    def _spool_fragment(self, context_id: int, data: bytes) -> bool:
        """Write one fragment to the current message's spool; whether it was spooled."""
        message = self.message
        if message is None:
            return False
        if message is not self._message:  # the first data set fragment of a new message
            self._discard()
            self._message = message
            self._spool = self._open(message, context_id)
        if self._spool is None:
            return False
        self._spool.write(memoryview(data)[1:])
        return True

    def _open(self, message: DIMSEMessage, context_id: int) -> Spool | None:
        """A spool for a C-STORE-RQ whose data set starts now, or ``None``."""
        if self.opener is None or not isinstance(message, C_STORE_RQ) or message.data_set is None or message.data_set.tell():
            return None
        command = message.command_set
        if self._syntaxes is None:
            self._syntaxes = {
                cx.context_id: str(cx.transfer_syntax[0])
                for cx in self.assoc.accepted_contexts
                if cx.context_id is not None
            }
        syntax = self._syntaxes.get(context_id)
        try:
            sop_class = str(command.AffectedSOPClassUID or "")
            sop_instance = str(command.AffectedSOPInstanceUID or "")
        except Exception:  # an odd command set: pynetdicom will judge it; we do not spool it
            return None
        if syntax is None or not sop_class or not sop_instance:
            return None
        return self.opener(sop_class, sop_instance, syntax)

    def _finish(self) -> None:
        message, spool = self._message, self._spool
        self._message = self._spool = None
        if spool is None or message is None:
            return
        try:
            message_id = int(message.command_set.MessageID)
        except Exception:
            spool.close()
            return
        with self._lock:
            # one message at a time per association: an untaken older spool is stale
            stale = list(self._complete.values())
            self._complete = {message_id: spool}
        for old in stale:
            old.close()

    def _discard(self) -> None:
        if self._spool is not None:
            self._spool.close()
        self._message = self._spool = None

    def take_spool(self, message_id: int) -> Spool | None:
        """The spool of the complete C-STORE-RQ ``message_id`` (the caller commits or closes it)."""
        with self._lock:
            return self._complete.pop(message_id, None)

    def close_spools(self) -> None:
        """Drop every spool (the connection closed)."""
        with self._lock:
            spools = list(self._complete.values())
            self._complete = {}
        self._discard()
        for spool in spools:
            spool.close()

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


def take_spool(assoc: Any, message_id: int | None) -> Spool | None:
    """The spool holding C-STORE ``message_id``'s data set, if the association spooled it."""
    dimse = getattr(assoc, "dimse", None)
    if not isinstance(dimse, ListenerDIMSE) or message_id is None:
        return None
    return dimse.take_spool(int(message_id))


def close_spools(assoc: Any) -> None:
    """Drop the association's spools (``evt.EVT_CONN_CLOSE``)."""
    dimse = getattr(assoc, "dimse", None)
    if isinstance(dimse, ListenerDIMSE):
        dimse.close_spools()


class ListenerRequestHandler(RequestHandler):
    """pynetdicom's request handler, giving each association the lean socket and DIMSE provider.

    The server may carry a ``spool_opener`` (a :data:`SpoolOpener`).
    """

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dimse = ListenerDIMSE(assoc, getattr(self.server, "spool_opener", None))
        # the socket pynetdicom made for this connection, with our recv
        assoc.dul.socket.__class__ = ListenerSocket
        return assoc

"""Associations to a DICOM source, with errors an operator can act on.

Every association is opened through :func:`associate`, which takes one of the
source's association slots (``max_associations``) for its lifetime and turns
a rejection or an unreachable peer into a :class:`SourceUnavailable` naming
the ``[[sources]]`` setting to check.
"""

from __future__ import annotations

import enum
import ssl
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association

from preread.ingest.listener.transport import no_delay
from preread.ingest.sweep.sources import DicomSource

#: Seconds to wait for an association, a DIMSE response, and an idle network.
ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 120.0
NETWORK_TIMEOUT = 120.0


class QRStatus(enum.IntEnum):
    """Query/Retrieve statuses (PS3.4 C.4) the sweep reacts to."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUBOPS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SUBOPS_FAILED_WARNING = 0xB000
    UNABLE_TO_PROCESS = 0xC000


#: Statuses meaning "a result limit was hit": the query is repeated over smaller time spans.
LIMIT_STATUSES = frozenset({QRStatus.OUT_OF_RESOURCES, QRStatus.OUT_OF_RESOURCES_MATCHES, QRStatus.CANCEL})


class SourceUnavailable(RuntimeError):
    """The source cannot be reached or refuses us; the message says what to configure."""


_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def slots(name: str, limit: int) -> threading.BoundedSemaphore:
    """The association slots of source ``name`` in this process (``max_associations``), shared by its sweeps."""
    with _slots_lock:
        return _slots.setdefault((name, limit), threading.BoundedSemaphore(limit))


def client_tls(source: DicomSource) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom ``tls_args`` for a source with a ``tls`` table."""
    if source.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(source.tls.ca) if source.tls.ca else None)
    if source.tls.cert is not None:
        context.load_cert_chain(str(source.tls.cert), str(source.tls.key) if source.tls.key else None)
    return context, source.host


def where(source: DicomSource) -> str:
    """``AE@host:port`` of a source, for messages."""
    return f"{source.ae_title}@{source.host}:{source.port}"


@contextmanager
def associate(
    source: DicomSource,
    calling_ae: str,
    contexts: Sequence[tuple[str, Sequence[str] | None]],
    *,
    roles: Sequence[Any] = (),
    handlers: Sequence[Any] = (),
) -> Iterator[Association]:
    """An established association to ``source`` holding one of its slots; released on exit."""
    ae = AE(ae_title=source.calling_ae_title or calling_ae)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = ACSE_TIMEOUT, DIMSE_TIMEOUT, NETWORK_TIMEOUT
    ae.maximum_pdu_size = 1024 * 1024
    for abstract, syntaxes in contexts:
        if syntaxes is None:
            ae.add_requested_context(abstract)
        else:
            ae.add_requested_context(abstract, list(syntaxes))
    reasons: list[str] = []

    def on_acse(event: Any) -> None:
        primitive = getattr(event, "primitive", None)
        if primitive is not None and getattr(primitive, "result", None) not in (None, 0):
            try:
                reasons.append(f"{primitive.result_str}: {primitive.reason_str}")
            except Exception:  # an unusual primitive: the generic message will do
                pass

    with slots(source.name, source.max_associations):
        assoc = ae.associate(
            source.host, source.port, ae_title=source.ae_title, ext_neg=list(roles) or None,
            evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, no_delay), *handlers],
            tls_args=client_tls(source),
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                why = reasons[0] if reasons else "rejected"
                raise SourceUnavailable(
                    f"source {source.name!r}: {where(source)} rejected the association ({why}); check ae_title in "
                    f"[[sources]] and that the PACS accepts calling AE {ae.ae_title!r}"
                )
            raise SourceUnavailable(
                f"source {source.name!r}: cannot associate with {where(source)} (connection refused, aborted or timed "
                "out); check host and port in [[sources]] and that the PACS is up"
            )
        try:
            if not assoc.accepted_contexts:
                raise SourceUnavailable(
                    f"source {source.name!r}: {where(source)} accepted none of our presentation contexts"
                )
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()

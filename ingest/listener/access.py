"""Who may open an association: the ``PREREAD_ALLOWED_AES`` allowlist.

The setting is a comma-separated list of calling AE titles, each optionally
``AE@address`` to also pin the peer's source address (``AE@10.0.0.5``). An
empty setting allows every caller. The check runs on ``evt.EVT_REQUESTED``,
before any presentation context is negotiated, and rejects with
A-ASSOCIATE-RJ "calling AE title not recognised".
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom.events import Event

LOGGER = logging.getLogger("preread.ingest.access")

#: A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised.
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAG_CALLING_AE_NOT_RECOGNISED = 0x03


@dataclass(frozen=True, slots=True)
class AllowedPeer:
    """One allowlist entry: a calling AE title and, optionally, an address or network."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def matches(self, ae_title: str, address: str) -> bool:
        """Whether a caller with ``ae_title`` from ``address`` is this peer."""
        if ae_title.strip() != self.ae_title:
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address.split("%", 1)[0]) in self.network
        except ValueError:
            return False


def parse_allowlist(value: str | Sequence[str] | None) -> list[AllowedPeer]:
    """Parse ``"AE1,AE2@10.0.0.5,AE3@10.1.0.0/16"`` (or those entries as a list); empty allows everyone."""
    peers: list[AllowedPeer] = []
    for raw in (value or "").split(",") if isinstance(value, str) or value is None else value:
        item = raw.strip()
        if not item:
            continue
        title, _, address = item.partition("@")
        title = title.strip()
        if not title or len(title) > 16:
            raise ValueError(f"invalid AE title in allowlist: {title!r}")
        network = ipaddress.ip_network(address.strip(), strict=False) if address.strip() else None
        peers.append(AllowedPeer(title, network))
    return peers


def is_allowed(peers: list[AllowedPeer], ae_title: str, address: str) -> bool:
    """Whether the caller may associate; an empty allowlist allows all."""
    return not peers or any(peer.matches(ae_title, address) for peer in peers)


def handle_requested(event: Event, peers: list[AllowedPeer]) -> None:
    """``evt.EVT_REQUESTED`` handler: reject callers not on the allowlist."""
    if not peers:
        return
    requestor = event.assoc.requestor
    # the A-ASSOCIATE-RQ itself: requestor.ae_title is only filled in during negotiation
    primitive = requestor.primitive
    ae_title = str(getattr(primitive, "calling_ae_title", "") or "").strip()
    address = requestor.address or ""
    if is_allowed(peers, ae_title, address):
        return
    LOGGER.warning("association rejected: calling AE %r from %s is not allowed", ae_title, address)
    event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, DIAG_CALLING_AE_NOT_RECOGNISED)
    evt.trigger(event.assoc, evt.EVT_REJECTED, {})
    event.assoc.kill()

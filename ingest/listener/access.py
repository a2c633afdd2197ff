"""Who may open an association: calling AE allowlist, called AE titles, free space.

``PREREAD_ALLOWED_AES`` is a comma-separated list of calling AE titles, each
optionally ``AE@address`` to also pin the peer's source address
(``AE@10.0.0.5``); an empty setting allows every caller.
``PREREAD_CALLED_AES`` lists the called AE titles we answer to (empty: our
own ``PREREAD_AE_TITLE``; ``*``: any). Below the free-space watermark no new
association is accepted. The checks run on the A-ASSOCIATE-RQ's fixed fields
in :mod:`~preread.ingest.listener.gate`, before pynetdicom creates an
association, and refuse with A-ASSOCIATE-RJ and the standard's reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from preread.ingest.listener import gate
from preread.ingest.storage.space import has_free_space


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


def called_ae_accepted(called_aes: list[str], own_title: str, called: str) -> bool:
    """Whether a request to ``called`` is for us: ``own_title`` unless ``called_aes`` is set (``*``: any)."""
    titles = called_aes or [own_title]
    return "*" in titles or called.strip() in (title.strip() for title in titles)


def admission(peers: list[AllowedPeer], called_aes: list[str], own_title: str, storage_dir: Path,
              min_free_bytes: int) -> Callable[[gate.AssociationRequest, str], gate.Rejection | None]:
    """The listener's judge of an A-ASSOCIATE-RQ from an address: ``None`` admits it."""

    def judge(request: gate.AssociationRequest, address: str) -> gate.Rejection | None:
        if not is_allowed(peers, request.calling_ae, address):
            return gate.rejected_calling_ae()
        if not called_ae_accepted(called_aes, own_title, request.called_ae):
            return gate.rejected_called_ae()
        if not has_free_space(storage_dir, min_free_bytes):
            return gate.local_limit("free space below watermark")
        return None

    return judge

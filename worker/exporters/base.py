"""The exporter protocol and registry: one module per destination kind.

An exporter sends one report (an :class:`ExportContext`) to one destination. It raises
:class:`DeliveryError` when the peer is unreachable or refuses for now (the delivery is
retried with backoff) and :class:`PermanentDeliveryError` when retrying cannot help.
Modules are imported on first use, so a deployment without FHIR never imports fhir.resources.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from preread.schemas.settings import Settings
from preread.worker.exporters.context import ExportContext


class DeliveryError(ConnectionError):
    """Sending failed for now (peer down, timeout, refused): try again later. The message names no patient."""


class PermanentDeliveryError(DeliveryError):
    """The peer refused the content itself; retrying the same content cannot help."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a send left to do: a Storage Commitment transaction to wait for, if one was asked."""

    commitment_uid: str | None = None


class Exporter(Protocol):
    """Sends one report to the destination it was made for."""

    def send(self, ctx: ExportContext, settings: Settings) -> SendResult:
        """Send ``ctx``; raise :class:`DeliveryError` on failure."""
        ...


@runtime_checkable
class PreparingExporter(Exporter, Protocol):
    """An exporter that builds its payload apart from sending it, so the next one is built while one is sent."""

    def prepare(self, ctx: ExportContext, settings: Settings) -> Any:
        """Build what :meth:`send_prepared` sends (e.g. the SR data set)."""
        ...

    def send_prepared(self, payload: Any, settings: Settings) -> SendResult:
        """Send a payload :meth:`prepare` built; raise :class:`DeliveryError` on failure."""
        ...


#: kind → the module that registers it.
MODULES = {
    "dicom": "preread.worker.exporters.dicom",
    "dicomweb": "preread.worker.exporters.dicomweb",
    "fhir": "preread.worker.exporters.fhir",
    "webhook": "preread.worker.exporters.webhook",
    "hl7": "preread.worker.exporters.hl7",
    "folder": "preread.worker.exporters.folder",
}

_REGISTRY: dict[str, Callable[[Any], Exporter]] = {}


def register(kind: str) -> Callable[[Callable[[Any], Exporter]], Callable[[Any], Exporter]]:
    """Class decorator: ``@register("dicom")`` makes the class the exporter of that kind."""

    def decorate(factory: Callable[[Any], Exporter]) -> Callable[[Any], Exporter]:
        _REGISTRY[kind] = factory
        return factory

    return decorate


def exporter_for(destination: Any) -> Exporter:
    """The exporter for a destination model (``destination.kind`` picks the module)."""
    kind = destination.kind
    if kind not in _REGISTRY:
        module = MODULES.get(kind)
        if module is None:
            raise PermanentDeliveryError(f"no exporter for destination kind {kind!r}")
        importlib.import_module(module)
    return _REGISTRY[kind](destination)

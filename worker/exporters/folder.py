"""Files in a folder: today's FHIR file as the ``folder`` destination kind, plus SR, webhook JSON and HL7.

One file per study and kind sent, named by Study Instance UID (a re-draft replaces it),
written atomically: ``<uid>.json`` (FHIR Bundle), ``<uid>.sr.dcm``, ``<uid>.webhook.json``,
``<uid>.hl7``. The default folder is the data dir's ``exports``.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

from preread.ingest.storage.files import write_atomic
from preread.schemas.settings import Settings
from preread.worker.exporters.base import DeliveryError, SendResult, register
from preread.worker.exporters.context import ExportContext

SUFFIXES = {"fhir": ".json", "sr": ".sr.dcm", "webhook": ".webhook.json", "hl7": ".hl7"}


def render(kind: str, ctx: ExportContext, settings: Settings) -> bytes:
    """The bytes of one sendable kind."""
    if kind == "fhir":
        from preread.worker.exporters.fhir import bundle_json

        return bytes(bundle_json(ctx, settings))
    if kind == "sr":
        from preread.worker.exporters.sr import build_sr

        buffer = BytesIO()
        build_sr(ctx, settings).save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    if kind == "webhook":
        from preread.worker.exporters.webhook import webhook_body

        return bytes(webhook_body(ctx))
    from preread.worker.exporters.hl7 import oru_message

    return str(oru_message(ctx, settings)).encode()


@register("folder")
class FolderExporter:
    """Writes each of the destination's ``sends`` as a file."""

    def __init__(self, destination: Any) -> None:
        self.destination = destination

    def folder(self, settings: Settings) -> Path:
        """Where files go."""
        return Path(self.destination.path) if self.destination.path else settings.exports_dir

    def send(self, ctx: ExportContext, settings: Settings) -> SendResult:
        """Write every kind; a full or read-only disk is a delivery error (retried)."""
        folder = self.folder(settings)
        for kind in self.destination.sends:
            data = render(kind, ctx, settings)
            try:
                write_atomic(folder / f"{ctx.study_instance_uid}{SUFFIXES[kind]}", [data])
            except OSError as exc:
                raise DeliveryError(f"folder {self.destination.name!r}: cannot write: {exc.strerror}") from None
        return SendResult()

"""The SR to a DICOMweb origin server: STOW-RS (PS3.18 10.5), one multipart/related POST per report.

The answer is checked, not just its HTTP status: a Failed SOP Sequence (0008,1198) in the
response means the instance was not stored (HTTP 202 or 409), which is a delivery error.
"""

from __future__ import annotations

import json
import secrets
from io import BytesIO
from typing import Any

from preread.schemas.settings import Settings
from preread.worker.exporters.base import DeliveryError, SendResult, register
from preread.worker.exporters.context import ExportContext
from preread.worker.exporters.http import bearer, post
from preread.worker.exporters.sr import build_sr

#: Failed SOP Sequence, as a DICOM JSON key.
FAILED_SOP_SEQUENCE = "00081198"


def multipart(parts: list[bytes], boundary: str) -> bytes:
    """A multipart/related body of ``application/dicom`` parts."""
    out = BytesIO()
    for part in parts:
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(part)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


@register("dicomweb")
class DicomWebExporter:
    """STOW-RS of the report's SR to ``url`` + ``/studies``."""

    def __init__(self, destination: Any) -> None:
        self.destination = destination

    def send(self, ctx: ExportContext, settings: Settings) -> SendResult:
        """Build the SR as a Part 10 file and store it."""
        buffer = BytesIO()
        build_sr(ctx, settings).save_as(buffer, enforce_file_format=True)
        boundary = f"preread-{secrets.token_hex(12)}"
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            **bearer(self.destination.token),
        }
        name = f"DICOMweb destination {self.destination.name!r}"
        answer = post(self.destination.url.rstrip("/") + "/studies", multipart([buffer.getvalue()], boundary), headers,
                      self.destination.timeout, name)
        try:
            failed = json.loads(answer or b"{}").get(FAILED_SOP_SEQUENCE) if answer.strip() else None
        except (ValueError, AttributeError):
            failed = None
        if failed and failed.get("Value"):
            raise DeliveryError(f"{name}: the SR is listed in the Failed SOP Sequence")
        return SendResult()

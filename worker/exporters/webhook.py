"""Signed JSON to a URL: today's webhook as the ``webhook`` destination kind.

The body is HMAC-SHA256-signed with the destination's secret in ``X-Preread-Signature``.
It carries no patient name or ID: the receiver matches on Study Instance UID and accession.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from preread.schemas.settings import Settings
from preread.worker.exporters.base import SendResult, register
from preread.worker.exporters.context import ExportContext
from preread.worker.exporters.http import post

SIGNATURE_HEADER = "X-Preread-Signature"


def sign(body: bytes, secret: str) -> str:
    """The webhook signature: ``sha256=<hex HMAC of the body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_payload(ctx: ExportContext) -> dict[str, Any]:
    """The ``draft.ready`` event: study identifiers, urgency, the draft and its structure, probe scores."""
    return {
        "event": "draft.ready",
        "study_instance_uid": ctx.study_instance_uid,
        "accession_number": ctx.accession_number,
        "urgency": ctx.urgency,
        "report": {"draft": ctx.draft_text, "structured": ctx.structured, "parse_status": ctx.parse_status},
        "probes": [{"condition": p.condition, "score": p.score, "present": p.present} for p in ctx.probes],
    }


def webhook_body(ctx: ExportContext) -> bytes:
    """The payload as canonical JSON (sorted keys), the bytes that are signed."""
    return json.dumps(webhook_payload(ctx), sort_keys=True).encode()


@register("webhook")
class WebhookExporter:
    """POSTs the signed ``draft.ready`` JSON."""

    def __init__(self, destination: Any) -> None:
        self.destination = destination

    def send(self, ctx: ExportContext, settings: Settings) -> SendResult:
        """One POST; a non-2xx answer or no answer is a delivery error."""
        body = webhook_body(ctx)
        headers = {"Content-Type": "application/json"}
        if self.destination.secret:
            headers[SIGNATURE_HEADER] = sign(body, self.destination.secret)
        post(self.destination.url, body, headers, self.destination.timeout, f"webhook {self.destination.name!r}")
        return SendResult()

"""One HTTP POST for the HTTP-based exporters (webhook, FHIR, STOW-RS), with their shared error policy.

2xx is success; 408, 429 and 5xx, timeouts and connection errors are worth another try
(:class:`DeliveryError`); any other 4xx means the peer refuses this content
(:class:`PermanentDeliveryError`). Error text names the status, never the body (it may hold PHI).
"""

from __future__ import annotations

import urllib.error
import urllib.request

from preread.worker.exporters.base import DeliveryError, PermanentDeliveryError

RETRYABLE_STATUS = {408, 425, 429}


def post(url: str, body: bytes, headers: dict[str, str], timeout: float, what: str) -> bytes:
    """POST ``body`` to ``url``; the response body on 2xx, else a delivery error naming ``what``."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (URL from settings)
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        message = f"{what} answered HTTP {exc.code}"
        if exc.code in RETRYABLE_STATUS or exc.code >= 500:
            raise DeliveryError(message) from None
        raise PermanentDeliveryError(message) from None
    except (OSError, TimeoutError) as exc:
        raise DeliveryError(f"{what} unreachable: {type(exc).__name__}") from None


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for a bearer token, if any."""
    return {"Authorization": f"Bearer {token}"} if token else {}

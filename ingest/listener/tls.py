"""The listener's TLS context, built from the ``PREREAD_TLS_*`` settings."""

from __future__ import annotations

import ssl

from preread.schemas.settings import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """A server-side :class:`ssl.SSLContext`, or ``None`` when TLS is not configured.

    TLS 1.2 or newer. With ``tls_ca`` set, peers must present a certificate
    signed by that CA (mutual TLS), as DICOM's secure transport profiles ask.
    """
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None:
        raise ValueError("PREREAD_TLS_KEY is set but PREREAD_TLS_CERT is not")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context

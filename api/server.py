"""Serving the API with uvicorn: loopback by default, TLS when a certificate is configured."""

from __future__ import annotations

import ipaddress
import socket

from preread.schemas.settings import Settings


class ApiConfigError(Exception):
    """A setting keeps the API from starting; the message names it and the fix."""


def check_settings(settings: Settings) -> None:
    """Fail early, in one line, on settings uvicorn would only report with a traceback."""
    for part in (settings.api_open_to or "").split(","):
        if part.strip():
            try:
                ipaddress.ip_network(part.strip(), strict=False)
            except ValueError:
                raise ApiConfigError(f"PREREAD_API_OPEN_TO: {part.strip()!r} is not an address or network (e.g. 10.0.0.0/8)") from None
    if bool(settings.api_tls_cert) != bool(settings.api_tls_key):
        raise ApiConfigError("PREREAD_API_TLS_CERT and PREREAD_API_TLS_KEY go together: set both, or neither")
    for path in (settings.api_tls_cert, settings.api_tls_key):
        if path is not None and not path.is_file():
            raise ApiConfigError(f"TLS file {path} does not exist (PREREAD_API_TLS_CERT / PREREAD_API_TLS_KEY)")
    family = socket.AF_INET6 if ":" in settings.api_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.api_host, settings.api_port))
        except OSError as exc:
            raise ApiConfigError(
                f"cannot bind {settings.api_host}:{settings.api_port} ({exc.strerror}); "
                "set PREREAD_API_PORT to a free port or PREREAD_API_HOST to a local address"
            ) from None


def dashboard_url(settings: Settings) -> str:
    """Where a browser on this machine finds the dashboard."""
    scheme = "https" if settings.api_tls_cert else "http"
    host = settings.api_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.api_port}/"


def serve(settings: Settings, log_level: str = "info") -> None:
    """Run the API until interrupted."""
    import uvicorn

    from preread.api.app import create_app

    check_settings(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        ssl_certfile=str(settings.api_tls_cert) if settings.api_tls_cert else None,
        ssl_keyfile=str(settings.api_tls_key) if settings.api_tls_key else None,
        log_level=log_level.lower(),
        access_log=True,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=30,
    )

"""``preread listen``: the DICOM listener (C-ECHO, C-STORE) as a service."""

from __future__ import annotations

from typing import Annotated, Any

import typer


def listen(
    port: Annotated[int | None, typer.Option(help="DICOM port (default PREREAD_PORT, 11112).")] = None,
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="Our AE title (default PREREAD_AE_TITLE).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default PREREAD_HOST).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes sharing the port (SO_REUSEPORT).")] = 1,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Receive DICOM instances: store them durably, index them, mark quiet studies STABLE."""
    from preread.ingest.listener.serving import configure_logging, serve
    from preread.schemas.settings import Settings

    configure_logging(log_level)
    overrides: dict[str, Any] = {k: v for k, v in {"port": port, "ae_title": ae_title, "host": host}.items() if v is not None}
    settings = Settings(**overrides) if overrides else Settings()
    from preread.schemas.tables import ProcessRole, ProcessState
    from preread.worker.pipeline.heartbeat import HeartbeatWriter

    beat = HeartbeatWriter(settings.effective_database_url, ProcessRole.LISTENER, state=ProcessState.READY,
                           details={"port": settings.port, "ae_title": settings.ae_title}).start()
    try:
        code = serve(settings, workers=workers, log_level=log_level)
    finally:
        beat.stop()
    raise typer.Exit(code)

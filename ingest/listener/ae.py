"""The DICOM listener's lifecycle: the pynetdicom AE, its server thread and the stability monitor.

The public entry point for embedding is :class:`Listener`::

    listener = Listener(settings)
    listener.start()          # binds, serves in a thread, starts the stability monitor
    ...
    listener.stop()

Who gets in is :mod:`.access` and :mod:`.gate`, what an instance becomes is
:mod:`.handlers`, and every pynetdicom extension is in :mod:`.transport`. The
Storage Commitment results a PACS sends back (N-EVENT-REPORT) go to
:func:`preread.worker.exporters.commitment.handle_n_event_report`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from preread.ingest.assembly import release
from preread.ingest.assembly.index import InstanceIndex
from preread.ingest.assembly.stability import StabilityMonitor
from preread.ingest.listener import access, gate, handlers, transport
from preread.ingest.listener.handlers import IngestContext
from preread.ingest.listener.tls import server_context
from preread.ingest.storage import files
from preread.schemas.database import engine_for
from preread.schemas.settings import Settings
from preread.worker.exporters.commitment import COMMITMENT_CONTEXT_ROLES, COMMITMENT_SOP_CLASS, handle_n_event_report

LOGGER = logging.getLogger("preread.ingest.listener")

#: Transfer syntaxes accepted for every storage SOP class, preferred first.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

#: Associations served at once by one process.
MAX_ASSOCIATIONS = 64
#: Largest P-DATA PDU we accept (advertised as Maximum Length Received): fewer, larger PDUs mean less Python.
MAX_PDU_SIZE = 1024 * 1024


def build_ae(ae_title: str) -> AE:
    """An AE supporting Verification, every storage SOP class with :data:`TRANSFER_SYNTAXES`, and the
    Storage Commitment Push Model with the PACS in the SCP role (it sends us the N-EVENT-REPORT)."""
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.maximum_pdu_size = MAX_PDU_SIZE
    ae.add_supported_context(Verification)
    ae.add_supported_context(COMMITMENT_SOP_CLASS, scu_role=COMMITMENT_CONTEXT_ROLES["scu_role"],
                             scp_role=COMMITMENT_CONTEXT_ROLES["scp_role"])
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def event_handlers(ctx: IngestContext, settings: Settings, on_hint: Callable[[float], None] | None = None) -> list[Any]:
    """The listener's pynetdicom event handlers (the N-EVENT-REPORT confirms our SR deliveries).

    ``on_hint`` hears when a released association's grace ends (the stability monitor's ``due_in``).
    """
    return [
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [ctx]),
        (evt.EVT_N_EVENT_REPORT, handle_n_event_report, [settings]),
        (evt.EVT_ACCEPTED, handlers.handle_accepted),
        (evt.EVT_CONN_CLOSE, handlers.handle_closed),
        (evt.EVT_RELEASED, release.handle_released, [ctx.index.engine, settings, on_hint, ctx.index.writer]),
        (evt.EVT_ABORTED, release.handle_aborted),
    ]


def quiet_pydicom() -> None:
    """No value validation on read, no pydicom warnings in our logs: their texts may quote patient data."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class Listener:
    """One listening process: the AE, its server thread and the stability monitor."""

    def __init__(
        self,
        settings: Settings,
        *,
        reuse_port: bool = False,
        monitor: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
    ) -> None:
        quiet_pydicom()
        self.settings = settings
        self.reuse_port = reuse_port
        #: a listening socket shared with sibling processes, used instead of binding one
        self.listen_socket = listen_socket
        self.ssl_context = ssl_context if ssl_context is not None else server_context(settings)
        url = settings.effective_database_url
        self.ctx = IngestContext(
            storage_dir=settings.storage_dir.resolve(),
            quarantine_dir=settings.quarantine_dir.resolve(),
            min_free_bytes=settings.min_free_bytes,
            # its own engine: no ping per checkout (the index retries on a dead connection itself)
            index=InstanceIndex(engine_for(url, sync_writes=settings.sync_writes, pre_ping=False)),
            sync_writes=settings.sync_writes,
        )
        self.judge = access.admission(access.parse_allowlist(settings.allowed_aes), settings.called_aes,
                                      settings.ae_title, self.ctx.storage_dir, settings.min_free_bytes)
        self.door = gate.Door(settings.max_connections_per_address, transport.MAX_WAITING, MAX_ASSOCIATIONS)
        self.ae = build_ae(settings.ae_title)
        from preread.worker.pipeline.outbox import OutboxPublisher  # publishes what the monitor commits

        self.monitor = StabilityMonitor(url, settings.stable_after, publish=OutboxPublisher(settings)) if monitor else None
        self.server: transport.ListenerServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); useful with port 0."""
        if self.server is None:
            raise RuntimeError("listener not started")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind the port, serve associations in a background thread, start the monitor."""
        self.ctx.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.ctx.file_pool is None:
            self.ctx.file_pool = files.FilePool(self.ctx.storage_dir)
        transport.quiet_pynetdicom()
        transport.memoize_uid_checks()
        server = self.ae.make_server(
            (self.settings.host, self.settings.port),
            evt_handlers=event_handlers(self.ctx, self.settings, self.monitor.due_in if self.monitor else None),
            server_class=transport.ListenerServer,
            request_handler=transport.ListenerRequestHandler,
            door=self.door,
            judge=self.judge,
            request_timeout=self.settings.association_request_timeout,
            tls=self.ssl_context,
            spool_opener=handlers.open_spool(self.ctx),
            listen_socket=self.listen_socket,
            reuse_port=self.reuse_port,
        )
        self.server = cast(transport.ListenerServer, server)  # make_server built our server_class
        self._thread = threading.Thread(target=server.serve_forever, name="preread-listener", daemon=True)
        self._thread.start()
        if self.monitor is not None:
            self.monitor.start()
        threading.Thread(target=self._sweep, name="preread-sweep", daemon=True).start()
        host, port = self.address
        LOGGER.info("listening as %s on %s:%d%s", self.settings.ae_title, host, port, " (TLS)" if self.ssl_context else "")

    def _sweep(self) -> None:
        """Remove temporary files a killed process left behind (in the background: a big store takes a while)."""
        try:
            removed = files.sweep_temporary(self.ctx.storage_dir) + files.sweep_temporary(self.ctx.quarantine_dir)
        except OSError as exc:
            LOGGER.warning("temporary file sweep failed: %s", exc.strerror)
            return
        if removed:
            LOGGER.info("removed %d stale temporary files", removed)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running associations finish (bounded), stop the monitor."""
        if self.server is not None:
            self.server.shutdown()
            deadline = time.monotonic() + timeout
            while self.server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self.server.active_associations:
                assoc.abort()
            self.server = None
        if self.monitor is not None:
            self.monitor.stop()
        if self.ctx.file_pool is not None:
            self.ctx.file_pool.close()
            self.ctx.file_pool = None

    def wait(self) -> None:
        """Block until the server thread ends."""
        if self._thread is not None:
            self._thread.join()

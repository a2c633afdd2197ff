"""Running the listener as a service: one process, or N on one port.

``serve(settings, workers=N)`` migrates the database once, then either runs
the listener in this process or starts N worker processes on one listening
socket that this process binds (``SO_REUSEADDR`` and ``SO_REUSEPORT``) and
hands to each of them. The workers share its accept queue, and a busy
worker lets an idle one accept first, so associations spread evenly and
ingest uses every core. (N sockets bound with ``SO_REUSEPORT`` would let
the kernel hash each connection to one of them: four associations then
split 2:2 over two workers only three times in eight.) SIGTERM or SIGINT
SIGHUP stops accepting, lets running associations finish (bounded) and exits
0; a worker that dies is restarted on the same socket by the one process
supervisor (:mod:`preread.cli.supervisor`, shared with ``preread run``),
which gives up on one that keeps failing the same way. A port already in use
is raised as :class:`PortInUse`, naming the address.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from preread.schemas.database import upgrade
from preread.schemas.settings import Settings

LOGGER = logging.getLogger("preread.ingest.serve")

#: Seconds running associations get to finish on shutdown.
DRAIN_SECONDS = 10.0
#: Least seconds between restarts of a crashed worker.
RESTART_BACKOFF = 1.0
#: Longest the main thread blocks before it runs Python again. The kernel may hand a stop signal to
#: any thread; CPython then runs the handler only when the main thread next executes bytecode, which
#: a main thread blocked in ``Event.wait()`` without a timeout never does.
SIGNAL_CHECK_S = 0.5
#: Signals that stop a listener cleanly (SIGHUP: its terminal closed, or ``preread run`` asked).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class PortInUse(OSError):
    """The listening address is taken by another program; ``host`` and ``port`` name it."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"address {host}:{port} already in use")
        self.host, self.port = host, port


@contextmanager
def _binding(settings: Settings) -> Iterator[None]:
    """Turn "address in use" while binding into :class:`PortInUse` naming the host and port."""
    try:
        yield
    except PortInUse:
        raise
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(settings.host, settings.port) from None
        raise


def configure_logging(level: str = "INFO") -> None:
    """Plain log lines with process id (no patient data is ever logged)."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    logging.getLogger().setLevel(numeric)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT/SIGHUP set ``stop``; returns a function restoring the old handlers."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def _handler(signum: int, _frame: object) -> None:
        LOGGER.info("signal %d: stopping", signum)
        stop.set()

    for sig in previous:
        signal.signal(sig, _handler)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def shared_socket(settings: Settings, backlog: int = 128) -> socket.socket:
    """A non-blocking listening socket on ``settings.host``/``settings.port`` for worker processes to share."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with _binding(settings):
            sock.bind((settings.host, settings.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def run_listener(settings: Settings, *, reuse_port: bool = False, stop: threading.Event | None = None,
                 listen_socket: socket.socket | None = None) -> None:
    """Run one listener (and its stability monitor) in this process until ``stop`` or SIGTERM/SIGINT.

    Signal handlers are installed only when called from the main thread.
    """
    from preread.ingest.listener.ae import Listener

    stop = stop or threading.Event()
    restore = _install_stop_handlers(stop) if threading.current_thread() is threading.main_thread() else None
    listener = Listener(settings, reuse_port=reuse_port, listen_socket=listen_socket)
    try:
        with _binding(settings):  # nothing runs yet when the bind fails: no stop to wait for
            listener.start()
    except BaseException:
        if restore:
            restore()
        raise
    try:
        while not stop.wait(SIGNAL_CHECK_S):  # see SIGNAL_CHECK_S
            pass
    finally:
        listener.stop(DRAIN_SECONDS)
        if restore:
            restore()
        LOGGER.info("listener stopped")


def _worker_main(settings: Settings, log_level: str, listen_socket: socket.socket) -> None:
    """Entry point of a worker process."""
    configure_logging(log_level)
    run_listener(settings, listen_socket=listen_socket)


def serve(settings: Settings, workers: int = 1, log_level: str = "INFO") -> int:
    """Migrate the database, then run ``workers`` listener processes until SIGTERM/SIGINT/SIGHUP."""
    upgrade(settings.effective_database_url)
    if workers <= 1:
        run_listener(settings)
        return 0
    from preread.cli.supervisor import Supervisor, process_child  # the one supervisor, shared with `preread run`

    listen_socket = shared_socket(settings)
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    supervisor = Supervisor(
        [process_child(f"listen-{i}", _worker_main, (settings, log_level, listen_socket)) for i in range(workers)],
        backoff_s=RESTART_BACKOFF,
    )
    try:
        supervisor.start()
        while not stop.wait(SIGNAL_CHECK_S):
            supervisor.poll()
    finally:
        supervisor.stop(DRAIN_SECONDS + 5)
        listen_socket.close()
        restore()
    return 0

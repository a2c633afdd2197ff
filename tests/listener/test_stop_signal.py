"""A stop signal ends the listener whichever of its threads the kernel hands it to.

The kernel delivers a signal sent to a process to any one of its threads. When
that is not the main thread, CPython runs the Python handler only once the main
thread executes bytecode again; a main thread blocked in ``Event.wait()``
without a timeout never does, and the listener ignored SIGTERM for good (seen
once in CI: ``preread run``'s restart test waited 180 s for "listener
stopped"). This test hands SIGTERM to a non-main thread on purpose.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.procs import base_env, free_port

#: ``preread listen``'s serving path; once the port answers, a helper thread sends SIGTERM to itself.
SCRIPT = """
import signal, socket, threading, time
from preread.ingest.listener.serving import configure_logging, serve
from preread.schemas.settings import Settings

settings = Settings()

def signal_from_another_thread():
    while True:
        try:
            socket.create_connection(("127.0.0.1", settings.port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(0.5)
    print("sending SIGTERM to a non-main thread", flush=True)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

configure_logging("INFO")
threading.Thread(target=signal_from_another_thread, daemon=True).start()
raise SystemExit(serve(settings))
"""


def test_sigterm_received_by_another_thread_still_stops_the_listener(tmp_path: Path) -> None:
    env = base_env(data_dir=tmp_path / "data", port=free_port(), host="127.0.0.1")
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the listener ignored SIGTERM:\n{exc.stdout!r}\n{exc.stderr!r}") from None
    output = done.stdout + done.stderr
    assert "sending SIGTERM to a non-main thread" in output
    assert done.returncode == 0, output
    assert "signal 15: stopping" in output and "listener stopped" in output, output

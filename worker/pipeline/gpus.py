"""``preread worker --gpus``: one worker process per GPU, each pinned with ``CUDA_VISIBLE_DEVICES``.

The supervisor starts ``preread worker`` once per device with ``CUDA_VISIBLE_DEVICES``
naming that one GPU, so each child sees a single ``cuda:0`` and loads the model once
(its readiness check, ``lifecycle._wait_for_model``, loads the process's engine). A child that dies is started again after a
backoff that doubles while it keeps dying young (each restart logged with its exit
status); one that dies young ``MAX_QUICK_DEATHS`` times in a row is given up on,
loudly, and the supervisor exits non-zero once no child is left. SIGTERM/SIGINT stop
every child (warm shutdown) and then the supervisor.

The per-worker figures ``preread status`` shows (device, model, batch occupancy,
drafts per minute) come from the ``heartbeats.details`` JSON; :func:`worker_details`
builds that dict for the heartbeat writer, and :func:`worker_lines` reads it back.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Environment variable that pins a process to some GPUs (CUDA's own).
VISIBLE = "CUDA_VISIBLE_DEVICES"
#: A child alive this long is healthy again: its restart backoff starts over.
HEALTHY_AFTER_S = 60.0
#: First and largest wait before restarting a child that died.
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
#: A child that dies young this many times in a row is given up on.
MAX_QUICK_DEATHS = 5


class NoGpus(Exception):
    """``--gpus`` asked for GPUs this machine does not have; the message says what it has."""


def cuda_device_count() -> int:
    """GPUs visible to this process (0 without CUDA or a driver)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # no torch build with CUDA, no driver: no GPU
        return 0


def parse_gpus(spec: str, available: Sequence[str]) -> list[str]:
    """The devices ``--gpus`` names: ``all`` or comma-separated indices, each one of ``available``.

    ``available`` are the values ``CUDA_VISIBLE_DEVICES`` may take on this machine (``"0"``, ``"1"``, ...).
    """
    if not available:
        raise NoGpus(f"--gpus {spec}: no CUDA GPU is visible on this machine; run `preread worker` without --gpus "
                     "(PREREAD_DEVICE=cpu), or check the NVIDIA driver and CUDA_VISIBLE_DEVICES")
    words = [w.strip() for w in spec.split(",") if w.strip()]
    if words == ["all"]:
        return list(available)
    unknown = [w for w in words if w not in available]
    if not words or unknown or len(set(words)) != len(words):
        raise NoGpus(f"--gpus {spec}: give 'all' or distinct indices from {', '.join(available)} "
                     f"(not {', '.join(unknown) or spec!r})")
    return words


def visible_gpus() -> list[str]:
    """What ``CUDA_VISIBLE_DEVICES`` may name here: the already visible ones if set, else ``0..n-1``."""
    count = cuda_device_count()
    pinned = [w.strip() for w in os.environ.get(VISIBLE, "").split(",") if w.strip()]
    if pinned and count:
        return pinned[:count]
    return [str(i) for i in range(count)]


@dataclass
class GpuChild:
    """One pinned worker process and its restart history."""

    device: str
    argv: list[str]
    env: dict[str, str]
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None
    given_up: bool = False

    def start(self) -> None:
        """Start (or start again) the child."""
        out: Any = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         stdin=subprocess.DEVNULL)
        finally:
            if out is not None:
                out.close()
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("GPU %s: worker started (pid %d)", self.device, self.proc.pid)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def check(self, now: float) -> None:
        """Notice a death and schedule, or perform, the restart."""
        if self.given_up or self.proc is None:
            return
        code = self.proc.poll()
        if code is None:
            if now - self.started_at >= HEALTHY_AFTER_S:
                self.quick_deaths = 0
            return
        if self.restart_at is None:
            young = now - self.started_at < HEALTHY_AFTER_S
            self.quick_deaths = self.quick_deaths + 1 if young else 0
            if self.quick_deaths >= MAX_QUICK_DEATHS:
                self.given_up = True
                log.error("GPU %s: worker died %d times in a row within %.0f s of starting (last exit %s); "
                          "not restarting it: see its log", self.device, self.quick_deaths, HEALTHY_AFTER_S, code)
                return
            wait = min(BACKOFF_S * 2 ** max(self.quick_deaths - 1, 0), MAX_BACKOFF_S)
            log.error("GPU %s: worker (pid %d) exited with %s; restarting in %.0f s", self.device, self.proc.pid, code, wait)
            self.restart_at = now + wait
        if now >= self.restart_at:
            self.restarts += 1
            self.start()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            log.warning("GPU %s: worker did not stop in time; killing it", self.device)
            self.proc.kill()
            self.proc.wait()


@dataclass
class GpuSupervisor:
    """Start one child per device and keep them running until :meth:`stop`."""

    devices: list[str]
    argv: list[str]
    #: extra environment for every child (e.g. ``PREREAD_DEVICE``); ``CUDA_VISIBLE_DEVICES`` is set per child
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    poll_s: float = 0.5
    children: list[GpuChild] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        base = {**os.environ, **self.env}
        for device in self.devices:
            child = GpuChild(
                device, list(self.argv), {**base, VISIBLE: device},
                self.log_dir / f"worker-gpu{device}.log" if self.log_dir else None,
            )
            child.start()
            self.children.append(child)

    def run(self) -> int:
        """Supervise until :meth:`stop` (0), or until every child was given up on (1)."""
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            for child in self.children:
                child.check(now)
            if self.children and all(c.given_up for c in self.children):
                log.error("every GPU worker was given up on; stopping")
                return 1
        return 0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop supervising; ask every child to stop, kill those that do not in ``timeout``."""
        self._stop.set()
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            child.wait(deadline - time.monotonic())


def supervise(devices: list[str], argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run a :class:`GpuSupervisor` in the foreground until SIGTERM/SIGINT; its exit status."""
    supervisor = GpuSupervisor(devices, argv, env or {})
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor._stop.set())
    supervisor.start()
    try:
        return supervisor.run()
    finally:
        supervisor.stop()


def per_gpu_workers(spec: str, queues: list[str], concurrency: int, pool: str | None, loglevel: str) -> int:
    """``preread worker --gpus``: the supervisor's exit status, or 2 with a one-line message without such GPUs."""
    import sys

    try:
        devices = parse_gpus(spec, visible_gpus())
    except NoGpus as exc:
        print(str(exc), file=sys.stderr)
        return 2
    argv = [sys.executable, "-m", "preread.cli.main", "worker", "--queues", ",".join(queues),
            "--concurrency", str(concurrency), "--loglevel", loglevel, *(["--pool", pool] if pool else [])]
    log.info("one worker per GPU: %s", ", ".join(devices))
    return supervise(devices, argv)


# --- what each worker reports, and how status shows it ------------------------------------------


class DraftMeter:
    """Drafts finished in this process over the last minute (thread-safe)."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def record(self) -> None:
        """One draft committed."""
        with self._lock:
            self._times.append(self._clock())

    def per_minute(self) -> float:
        """Drafts in the last window, scaled to a minute."""
        with self._lock:
            cutoff = self._clock() - self.window_s
            while self._times and self._times[0] < cutoff:
                self._times.popleft()
            return len(self._times) * 60.0 / self.window_s


#: The process's draft meter (``stages.infer_step`` records each committed draft).
DRAFTS = DraftMeter()


def batch_occupancy(engine: Any, last: int = 50) -> float | None:
    """Mean rows per draft-sized batch over the last ``last`` batches, as a share of the batch size."""
    batcher = getattr(engine, "_batcher", None)
    sizes = list(getattr(batcher, "batch_sizes", []) or [])[-last:]
    capacity = getattr(engine, "batch_size", None)
    if not sizes or not capacity:
        return None
    return round(min(sum(sizes) / len(sizes) / float(capacity), 1.0), 3)


def worker_details(model: str, device: str, engine: Any = None, meter: DraftMeter = DRAFTS) -> dict[str, Any]:
    """The ``heartbeats.details`` of an infer worker: device (with its pinned GPU), model, occupancy, drafts/min."""
    gpu = os.environ.get(VISIBLE)
    return {
        "device": device if not gpu or not device.startswith("cuda") else f"{device} (GPU {gpu})",
        "gpu": gpu,
        "model": model,
        "batch_occupancy": batch_occupancy(engine) if engine is not None else None,
        "drafts_per_minute": round(meter.per_minute(), 1),
    }


def worker_lines(rows: Sequence[tuple[str, int, dict[str, Any] | None]]) -> list[str]:
    """One line per worker heartbeat ``(host, pid, details)`` that has device details, for ``preread status``."""
    lines = []
    for host, pid, details in rows:
        if not details or "device" not in details:
            continue
        occupancy = details.get("batch_occupancy")
        shown = "-" if occupancy is None else f"{float(occupancy):.0%}"
        lines.append(f"worker {host}:{pid} on {details['device']}: model {details.get('model', '?')}, "
                     f"batch occupancy {shown}, {float(details.get('drafts_per_minute') or 0):.1f} drafts/min")
    return lines


def status_lines(url: str) -> list[str]:
    """:func:`worker_lines` for the worker heartbeats in the database at ``url``."""
    from sqlalchemy import select

    from preread.schemas.database import session_scope
    from preread.schemas.tables import Heartbeat, ProcessRole, ProcessState

    with session_scope(url) as session:
        rows = session.execute(
            select(Heartbeat.host, Heartbeat.pid, Heartbeat.details)
            .where(Heartbeat.role == ProcessRole.WORKER, Heartbeat.state != ProcessState.STOPPING)
            .order_by(Heartbeat.host, Heartbeat.pid)
        ).all()
    return worker_lines([(r.host, r.pid, r.details) for r in rows])

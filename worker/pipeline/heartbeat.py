"""Heartbeats: every long-running process says who it is, whether it is ready, and that it is alive.

One row per process in ``heartbeats`` (role, host, pid), upserted every few
seconds by a daemon thread. ``preread status``, the live view of ``preread
run`` and the API read the rows to say in plain words which role, or which
queue's worker, has not been seen, and why a worker is not ready.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update

from preread.schemas.database import session_scope
from preread.schemas.tables import Heartbeat, ProcessRole, ProcessState, utcnow

log = logging.getLogger(__name__)

#: The queue whose workers must have their model loaded before they take its tasks.
MODEL_QUEUE = "infer"
#: Seconds between two beats of a process.
BEAT_INTERVAL_S = 5.0
#: A process not seen for this long counts as gone.
SEEN_WITHIN_S = 60.0
#: The key under which ``preread retry`` asks a not-ready process to check again.
RECHECK_KEY = "recheck_requested"
#: Rows of processes not seen for this long are deleted by the coordinator.
PRUNE_AFTER = timedelta(days=1)


class HeartbeatWriter:
    """This process's heartbeat row, kept fresh by a daemon thread until :meth:`stop`."""

    def __init__(self, url: str, role: ProcessRole, *, queues: str = "", state: ProcessState = ProcessState.STARTING,
                 details: dict[str, Any] | None = None, interval: float = BEAT_INTERVAL_S) -> None:
        self.url, self.role, self.queues, self.interval = url, role, queues, interval
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.state, self.details = state, dict(details or {})
        self.reason: str | None = None
        self.started_at = utcnow()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        #: called before each beat for details that change while the process runs (an infer worker's drafts/min)
        self.refresh: Callable[[], dict[str, Any]] | None = None

    def start(self) -> HeartbeatWriter:
        """Keep the row fresh from a daemon thread (its first beat at once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"preread-heartbeat-{self.role}", daemon=True)
            self._thread.start()
        return self

    def mark(self, state: ProcessState, reason: str | None = None, **details: Any) -> None:
        """Change this process's state (and why) and write it at once."""
        with self._lock:
            self.state, self.reason = state, reason
            self.details.update(details)
        self.beat()

    def stop(self) -> None:
        """Stop beating and mark the row ``stopping``: a clean exit is not a lost process."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.mark(ProcessState.STOPPING, None)

    def beat(self) -> bool:
        """Upsert the row; False (logged once) while the database cannot be reached."""
        fresh: dict[str, Any] = {}
        if self.refresh is not None:
            try:
                fresh = self.refresh()
            except Exception as exc:  # a detail that cannot be read must not stop the beat
                log.debug("heartbeat details not refreshed: %s", exc)
        with self._lock:
            self.details.update(fresh)
            values: dict[str, Any] = dict(queues=self.queues, state=str(self.state), reason=self.reason,
                                          details=dict(self.details), last_seen=utcnow())
        try:
            with session_scope(self.url) as session:
                key = (Heartbeat.role == str(self.role), Heartbeat.host == self.host, Heartbeat.pid == self.pid)
                before = session.execute(select(Heartbeat.details).where(*key).with_for_update()).scalar_one_or_none()
                if before and RECHECK_KEY in before:  # a request of `preread retry` is kept, not overwritten
                    values["details"] = {**values["details"], RECHECK_KEY: before[RECHECK_KEY]}
                if not cast(CursorResult[Any], session.execute(update(Heartbeat).where(*key).values(**values))).rowcount:
                    session.add(Heartbeat(role=str(self.role), host=self.host, pid=self.pid,
                                          started_at=self.started_at, **values))
        except Exception as exc:  # a database away must not end the process it watches
            self._failures += 1
            if self._failures == 3:
                log.warning("heartbeat not written (%s); retrying every %.0f s", type(exc).__name__, self.interval)
            return False
        self._failures = 0
        return True

    def _run(self) -> None:
        self.beat()
        while not self._stop.wait(self.interval):
            self.beat()


@dataclass(frozen=True, slots=True)
class Seen:
    """A process seen recently."""

    role: str
    host: str
    pid: int
    queues: tuple[str, ...]
    state: str
    reason: str | None
    last_seen: datetime
    details: dict[str, Any]

    @property
    def ready(self) -> bool:
        return self.state == ProcessState.READY

    def serves(self, queue: str) -> bool:
        """Whether this worker takes ``queue``'s tasks now: not-ready is about the model, so only infer waits."""
        if self.role != ProcessRole.WORKER or queue not in self.queues:
            return False
        return self.ready or (self.state == ProcessState.NOT_READY and queue != MODEL_QUEUE)


def seen(url: str, within: float = SEEN_WITHIN_S) -> list[Seen]:
    """Processes seen in the last ``within`` seconds that have not stopped, oldest first."""
    cutoff = utcnow() - timedelta(seconds=within)
    with session_scope(url) as session:
        rows = session.scalars(
            select(Heartbeat)
            .where(Heartbeat.last_seen >= cutoff, Heartbeat.state != str(ProcessState.STOPPING))
            .order_by(Heartbeat.started_at, Heartbeat.id)
        ).all()
        return [Seen(r.role, r.host, r.pid, tuple(q for q in r.queues.split(",") if q), r.state, r.reason,
                     r.last_seen, dict(r.details or {})) for r in rows]


def ready_for(processes: list[Seen], queue: str) -> bool:
    """Whether a ready worker consuming ``queue`` has been seen."""
    return any(p.serves(queue) for p in processes)


def warnings(processes: list[Seen], queues: tuple[str, ...], *, need_export: bool,
             within: float = SEEN_WITHIN_S) -> list[str]:
    """What is missing, in plain words, for ``preread status`` and the live view."""
    lines = []
    if not any(p.role == ProcessRole.COORDINATOR for p in processes):
        lines.append(f"no coordinator seen in the last {within:.0f} s: run `preread coordinate` (or `preread run`); "
                     "without it nothing lost is re-enqueued")
    for queue in queues:
        if queue == "export" and not need_export:
            continue
        workers = [p for p in processes if p.role == ProcessRole.WORKER and queue in p.queues]
        if not workers:
            lines.append(f"no worker for the {queue} queue seen in the last {within:.0f} s: "
                         f"run `preread worker --queues {queue}`")
        elif not any(p.serves(queue) for p in workers):
            why = next((p.reason for p in workers if p.reason), "starting")
            lines.append(f"no ready {queue} worker: {why}")
    return lines


def request_recheck(url: str) -> int:
    """Ask every not-ready worker to check its readiness again now; returns how many were asked."""
    asked = 0
    with session_scope(url) as session:
        for row in session.scalars(select(Heartbeat).where(Heartbeat.state == str(ProcessState.NOT_READY))):
            row.details = {**(row.details or {}), RECHECK_KEY: utcnow().isoformat()}
            asked += 1
    return asked


def recheck_requested(url: str, since: datetime) -> bool:
    """Whether ``preread retry`` asked this process to recheck after ``since``."""
    with session_scope(url) as session:
        details = session.execute(
            select(Heartbeat.details).where(Heartbeat.host == socket.gethostname(), Heartbeat.pid == os.getpid(),
                                            Heartbeat.role == str(ProcessRole.WORKER))
        ).scalar_one_or_none()
    asked = (details or {}).get(RECHECK_KEY)
    return isinstance(asked, str) and datetime.fromisoformat(asked) > since


def prune(url: str) -> int:
    """Delete rows of processes not seen for a day."""
    with session_scope(url) as session:
        return int(cast(CursorResult[Any], session.execute(delete(Heartbeat).where(Heartbeat.last_seen < utcnow() - PRUNE_AFTER))).rowcount)

"""Study stability: a study that has gone quiet becomes STABLE and is handed on.

State lives only in the database (``studies.state``, ``last_received_at``),
so the monitor resumes after a restart and several listener processes may
run it at once: each pass is one transaction that flips quiet RECEIVING
studies to STABLE with a conditional UPDATE (Postgres: rows locked with
``FOR UPDATE SKIP LOCKED``) and writes one ``Outbox(topic="render")`` row per
flipped study in the same transaction. An instance that arrives later
re-opens the study (:func:`~preread.ingest.assembly.catalog.receive_study`).

The monitor then publishes the rows it committed (``publish``, the outbox
dispatcher), as the tasks do for their hand-offs, so a listener and workers
draft every study without a coordinator; the coordinator's dispatcher and
reconciler remain the backstop for a broker that was away.
A released association's completion hint (:mod:`~preread.ingest.assembly.release`)
makes a study STABLE before the idle timer, after its modality's grace: the listener
tells its monitor when that grace ends (:meth:`StabilityMonitor.due_in`), and the
monitor looks then instead of at its next tick (up to half a second later).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.orm import Session

from preread.ingest.sweep.ledger import not_held_by_sweep  # a study an open sweep holds waits for its release
from preread.schemas.database import session_scope
from preread.schemas.tables import Outbox, Study, StudyState, utcnow

LOGGER = logging.getLogger("preread.ingest.stability")

#: Outbox topic of the next stage.
RENDER_TOPIC = "render"
#: Most studies flipped in one transaction (the next pass takes the rest).
BATCH = 500
#: Seconds between publishing passes when no study was flipped (rows a broker outage left behind).
REPUBLISH_EVERY_S = 10.0
#: Seconds a pass waits after a release hint's time, so that the hint has passed in the database's clock too.
DUE_MARGIN_S = 0.005


def mark_stable(session: Session, stable_after: float, now: datetime | None = None) -> list[int]:
    """Flip RECEIVING studies quiet for ``stable_after`` seconds to STABLE, with their outbox rows.

    Returns the ids of the studies flipped. The caller commits; the flip and
    the outbox rows are one transaction.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stable_after)
    # quiet for stable_after, or hinted complete by a released association (its grace passed, nothing since:
    # see ingest/assembly/release.py); never while an open sweep holds it
    hinted = and_(Study.release_hint_at <= now, Study.last_received_at <= Study.released_at)
    quiet = (Study.state == StudyState.RECEIVING, or_(Study.last_received_at < cutoff, hinted), not_held_by_sweep())
    # A read first: SQLite takes its write lock only when there is work.
    if session.execute(select(Study.id).where(*quiet).limit(1)).first() is None:
        return []
    candidates = select(Study.id).where(*quiet).order_by(Study.last_received_at).limit(BATCH)
    if session.get_bind().dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    flipped = session.execute(
        update(Study)
        .where(Study.id.in_(candidates.scalar_subquery()), *quiet)
        .values(state=StudyState.STABLE, state_changed_at=now, updated_at=now)
        .returning(Study.id, Study.study_instance_uid, Study.priority)
        .execution_options(synchronize_session=False)
    ).all()
    if flipped:
        session.execute(
            insert(Outbox),
            [
                dict(
                    study_id=row.id,
                    topic=RENDER_TOPIC,
                    payload={"study_instance_uid": row.study_instance_uid, "reason": "stable"},
                    priority=row.priority or 0,
                    created_at=now,
                    attempts=0,
                )
                for row in flipped
            ],
        )
    return [row.id for row in flipped]


def run_once(url: str, stable_after: float) -> list[int]:
    """One monitor pass in its own transaction; returns the study ids made STABLE."""
    with session_scope(url) as session:
        ids = mark_stable(session, stable_after)
    for study_id in ids:
        LOGGER.info("study %d is STABLE (quiet for %.0f s or released), queued for %s", study_id, stable_after, RENDER_TOPIC)
    return ids


def default_interval(stable_after: float) -> float:
    """How often to look: a tenth of ``stable_after``, between 0.1 and 0.5 seconds (a release hint's grace may be 1 s)."""
    return min(max(stable_after / 10.0, 0.1), 0.5)


class StabilityMonitor:
    """A daemon thread running :func:`run_once` every ``interval`` seconds until :meth:`stop`.

    ``publish`` (the outbox dispatcher) runs after every pass that flipped a
    study, and every ``REPUBLISH_EVERY_S`` for rows a broker outage left unsent.
    :meth:`due_in` asks for a pass at a given time (a release hint's grace end)
    between the ticks.
    """

    def __init__(self, url: str, stable_after: float, interval: float | None = None,
                 publish: Callable[[], object] | None = None) -> None:
        self.url = url
        self.stable_after = stable_after
        self.interval = interval if interval is not None else default_interval(stable_after)
        self.publish = publish
        self._stop = threading.Event()
        self._nudged = threading.Event()
        self._due: list[float] = []  # a heap of monotonic times a pass is wanted at
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the monitor thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="preread-stability", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end and wait for it (bounded)."""
        self._stop.set()
        self._nudged.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def due_in(self, seconds: float) -> None:
        """Run a pass ``seconds`` from now (a released association's grace ends then), not at the next tick."""
        with self._lock:
            heapq.heappush(self._due, time.monotonic() + max(seconds, 0.0) + DUE_MARGIN_S)
        self._nudged.set()

    def _run(self) -> None:
        last_publish = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:  # this pass sees every hint due by now
                while self._due and self._due[0] <= started:
                    heapq.heappop(self._due)
            try:
                flipped = run_once(self.url, self.stable_after)
                if self.publish is not None and (flipped or time.monotonic() - last_publish > REPUBLISH_EVERY_S):
                    last_publish = time.monotonic()
                    self._publish()
            except Exception as exc:  # a database hiccup must not end the monitor
                LOGGER.warning("stability pass failed: %s: %s", type(exc).__name__, str(exc)[:200])
            self._nap(time.monotonic() + self.interval)

    def _nap(self, until: float) -> None:
        """Sleep until ``until`` or the earliest due time, whichever comes first (or :meth:`stop`)."""
        while not self._stop.is_set():
            with self._lock:
                wake_at = min(until, self._due[0]) if self._due else until
                self._nudged.clear()
            remaining = wake_at - time.monotonic()
            if remaining <= 0:
                return
            self._nudged.wait(remaining)

    def _publish(self) -> None:
        assert self.publish is not None
        try:
            self.publish()
        except Exception as exc:  # broker away: the rows stay unsent for the next pass or the coordinator
            LOGGER.warning("outbox not published (%s); will try again", type(exc).__name__)

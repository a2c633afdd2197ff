"""The coordinator's part of sweeps: claim open sweeps, work each in a thread, start scheduled ones.

:func:`run_sweeps_once` is called on every coordinator pass. It renews this
process's lease on the sweeps it works (a killed coordinator's sweeps are
taken over when the lease runs out), starts a :class:`SweepRunner` thread for
each sweep it newly holds, and starts the nightly sweeps of
``PREREAD_SWEEP_SCHEDULE`` (a unique ``schedule_key`` makes one deployment
start each once, however many coordinators run).

A runner queries one day per step, then retrieves the studies found, at most
``max_in_flight`` of its source waiting in the pipeline at once and at most
``max_associations`` associations open. Outside ``PREREAD_SWEEP_WINDOW`` it
retrieves nothing new and waits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from preread.ingest.assembly.index import writer_lock
from preread.ingest.listener.ae import IngestContext
from preread.ingest.sweep import ledger
from preread.ingest.sweep.dimse import SourceUnavailable
from preread.ingest.sweep.query import DicomQuery, FolderQuery, Query, QueryLimitHit, WebQuery, modality_list
from preread.ingest.sweep.retrieve import DicomRetrieve, FolderRetrieve, Retriever, WebRetrieve
from preread.ingest.sweep.sources import (
    DicomSource,
    DicomWebSource,
    FolderSource,
    Retrieve,
    SourceError,
    SweepEnv,
    find_source,
    load_sources,
)
from preread.ingest.sweep.store import ingest_context
from preread.ingest.sweep.window import Window, parse_cron, parse_window
from preread.schemas.database import engine_for, session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import SweepState, SweepStudyState, utcnow

log = logging.getLogger(__name__)

#: Seconds a coordinator's claim on a sweep lasts without renewal (a killed one's sweeps move on after this).
LEASE_S = 20.0
#: Retrieves of one study before it is released with what arrived (or failed if nothing did).
MAX_ATTEMPTS = 3
#: Seconds a runner waits when it has nothing to do (window closed, in-flight cap reached).
IDLE_S = 1.0
#: Seconds between claim passes (a new sweep starts within this).
CLAIM_EVERY_S = 2.0
#: How far back a missed scheduled start is still made up for.
SCHEDULE_GRACE = timedelta(hours=6)

OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

AnySource = DicomSource | DicomWebSource | FolderSource


def clients(source: AnySource, settings: Settings, ctx: IngestContext | None) -> tuple[Query, Retriever]:
    """The query and retrieve clients for a source."""
    if isinstance(source, DicomSource):
        query = DicomQuery(source, settings.ae_title)
        return query, DicomRetrieve(source, settings.ae_title, settings.ae_title, ctx)
    assert ctx is not None
    if isinstance(source, DicomWebSource):
        web = WebQuery(source)
        return web, WebRetrieve(source, ctx)
    folder = FolderQuery(source)
    return folder, FolderRetrieve(folder, ctx)


def prompt_version(settings: Settings) -> str:
    """The prompt version reports are made with now (for skipping studies already drafted)."""
    from preread.worker.inference.prompting import load_prompts

    return load_prompts(settings.prompts_path).version


class SweepRunner(threading.Thread):
    """Works one sweep until it ends, is paused or cancelled, or this process loses its lease."""

    def __init__(self, sweep_id: int, settings: Settings, source: AnySource, window: Window | None,
                 owner: str = OWNER, stop: threading.Event | None = None) -> None:
        super().__init__(name=f"preread-sweep-{sweep_id}", daemon=True)
        self.sweep_id = sweep_id
        self.settings = settings
        self.url = settings.effective_database_url
        self.source = source
        self.window = window
        self.owner = owner
        self.stop_event = stop or threading.Event()
        needs_ctx = not isinstance(source, DicomSource) or source.retrieve == Retrieve.C_GET
        self.ctx = ingest_context(settings) if needs_ctx else None
        self.query, self.retriever = clients(source, settings, self.ctx)
        self.model_id = settings.model
        #: SQLite's one writer at a time, handed over at once (as to the listener's index) instead of busy-polled
        self.engine = engine_for(self.url)
        self.writer = writer_lock(self.engine)
        self.prompt_version = prompt_version(settings)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                if not self.step():
                    break
        except SourceUnavailable as exc:
            log.error("sweep %d stopped: %s", self.sweep_id, exc)
            with session_scope(self.url) as session:
                ledger.change_state(session, self.sweep_id, SweepState.FAILED, ledger.ACTIVE)
                ledger.set_sweep(session, self.sweep_id, error=str(exc), note=None)
        except Exception as exc:  # the next coordinator pass starts it again
            log.exception("sweep %d: %s: %s", self.sweep_id, type(exc).__name__, exc)
            self.stop_event.wait(IDLE_S)

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A short writing transaction (Core, no ORM session), taking its turn with the listener's writers on a
        SQLite file."""
        with self.writer, self.engine.begin() as conn:
            yield conn

    def _note(self, text: str | None) -> None:
        with session_scope(self.url) as session:
            ledger.set_sweep(session, self.sweep_id, note=text)

    def step(self) -> bool:
        """One step (a day's query, or a batch of retrieves); False when the runner should end."""
        with session_scope(self.url) as session:
            sweep = ledger.still_ours(session, self.sweep_id, self.owner)
            if sweep is None:
                return False
            if self.window is not None and not sweep.ignore_window and not self.window.contains(datetime.now().astimezone()):
                if sweep.note != f"waiting for the window {self.window}":
                    sweep.note = f"waiting for the window {self.window}"
                idle = True
            else:
                idle = False
                if sweep.state == SweepState.QUEUED:
                    sweep.state = str(SweepState.RUNNING)
                    log.info("sweep %d of %s (%s to %s) started", sweep.id, sweep.source, sweep.date_from, sweep.date_to)
                day = sweep.next_day
                querying = day is not None and day <= sweep.date_to
                modalities = modality_list(sweep.modalities)
                force = sweep.force
        if idle:
            self.stop_event.wait(IDLE_S * 5)
            return True
        if querying:
            assert day is not None
            self._query_day(day, modalities, force)
            return True
        return self._retrieve_batch()

    def _query_day(self, day: Any, modalities: list[str], force: bool) -> None:
        self._note(f"querying {day}")
        try:
            studies = self.query.find_studies(day, modalities)
        except QueryLimitHit as exc:
            with session_scope(self.url) as session:
                ledger.set_sweep(session, self.sweep_id, error=str(exc))
            studies = []
        with session_scope(self.url) as session:
            sweep = ledger.still_ours(session, self.sweep_id, self.owner)
            if sweep is None:
                return
            skip = set() if force else ledger.current_report_uids(
                session, [s.study_uid for s in studies], self.model_id, self.prompt_version
            )
            added = ledger.add_found(session, sweep, studies, skip)
            sweep.next_day = day + timedelta(days=1)
            sweep.note = None
        log.info("sweep %d: %s: %d studies found, %d new, %d already drafted", self.sweep_id, day, len(studies), added,
                 len(skip))

    def _retrieve_batch(self) -> bool:
        with session_scope(self.url) as session:
            room = self.source.max_in_flight - ledger.in_flight(session, self.source.name)
            rows = [(r.id, r.study_instance_uid, r.expected, r.attempts) for r in ledger.next_studies(session, self.sweep_id, room)]
            if not rows:
                tally = ledger.counts(session, self.sweep_id)
                done = tally.waiting == 0 and tally.in_pipeline == 0
                ledger.set_sweep(session, self.sweep_id, counts=tally.as_dict(),
                                 note=None if done or room > 0 else f"{self.source.max_in_flight} studies in flight; waiting")
                if done:
                    ledger.change_state(session, self.sweep_id, SweepState.DONE, ledger.ACTIVE)
                    log.info("sweep %d done: %s", self.sweep_id, tally.as_dict())
                    return False
        if not rows:
            self.stop_event.wait(IDLE_S)
            return True
        self._note(f"retrieving {len(rows)} studies")
        pending = list(rows)
        lock = threading.Lock()

        workers = min(len(rows), self.source.max_associations)
        # each lane asks for up to the retriever's batch in one request, and the lanes share the rows evenly
        chunk = max(1, min(self.retriever.batch, -(-len(rows) // workers)))

        def worker() -> None:
            """Take studies off the batch, ``chunk`` a request, all on one association (reopened if it breaks)."""
            with ExitStack() as stack:
                assoc: Any = None
                while not self.stop_event.is_set():
                    with lock:
                        if not pending:
                            return
                        taken = pending[:min(chunk, self.retriever.batch)]
                        del pending[:len(taken)]
                    if assoc is None or not getattr(assoc, "is_established", True):
                        stack.close()
                        try:
                            assoc = stack.enter_context(self.retriever.association())
                        except SourceUnavailable:
                            raise
                        except Exception as exc:  # cannot associate now: this attempt fails, the next batch retries
                            for row in taken:
                                self._failed_attempt(row[0], row[1], row[3] + 1, f"{type(exc).__name__}: {exc}"[:500])
                            assoc = None
                            continue
                    self._some(taken, assoc=assoc, later=later)

        # the check and release after a retrieve run beside the next retrieve, not between two on an association
        checks: list[Future[None]] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sweep{self.sweep_id}-check") as checker:

            def later(check: Callable[[], None]) -> None:
                checks.append(checker.submit(check))

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sweep{self.sweep_id}") as pool:
                for future in [pool.submit(worker) for _ in range(workers)]:
                    future.result()
        for check in checks:
            check.result()
        with session_scope(self.url) as session:
            ledger.set_sweep(session, self.sweep_id, counts=ledger.counts(session, self.sweep_id).as_dict(), note=None)
        return True

    def _some(self, rows: list[tuple[int, str, int | None, int]], assoc: Any = None,
              later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Count (where the source gave no count), retrieve in one request, check and release these studies (on
        ``assoc``, the worker's association).

        Two short transactions for the lot: one records the counts and the
        attempts before the retrieve, one checks what arrived of each study and
        releases it (or not) after, handed to ``later`` when given (the batch's
        checker threads). A study's count is the larger of the one taken before
        (the study query's, or IMAGE level) and, when it was retrieved alone, the
        instances the source said it sent or failed to send.
        """
        if self.stop_event.is_set():
            return
        # (row id, study UID, expected, attempts, whether it is fetched), as recorded before the retrieve
        plans: list[tuple[int, str, int, int, bool]] = []
        raised = False
        try:
            with ExitStack() as stack:
                counts: dict[int, int] = {}
                for row_id, study_uid, expected, _ in rows:
                    if expected is None:
                        if assoc is None:  # DICOM: one association for the counts and the retrieve
                            assoc = stack.enter_context(self.retriever.association())
                        counts[row_id] = len(self.query.count_instances(study_uid, assoc))
                with self._writing() as session:
                    for row_id, study_uid, expected, attempts in rows:
                        expected = counts.get(row_id, expected)
                        assert expected is not None
                        _, received = ledger.received_count(session, study_uid)
                        fetch = expected == 0 or received < expected
                        values: dict[str, Any] = {"expected": expected} if row_id in counts else {}
                        if fetch:
                            attempts += 1
                            values.update(state=str(SweepStudyState.RETRIEVING), attempts=attempts)
                        elif row_id in counts:
                            values["state"] = str(SweepStudyState.COUNTED)
                        if values:
                            ledger.set_study(session, row_id, **values)
                        plans.append((row_id, study_uid, expected, attempts, fetch))
                fetched = [plan[1] for plan in plans if plan[4]]
                if fetched:
                    result = self.retriever.retrieve(fetched, assoc)
                    if result.failed:
                        log.info("sweep %d: %d sub-operations failed at the source (%d studies)", self.sweep_id,
                                 result.failed, len(fetched))
                    sent = result.completed + result.failed + result.warning
                    if len(plans) == 1 and sent > plans[0][2]:
                        plans[0] = (*plans[0][:2], sent, *plans[0][3:])
                        raised = True
        except SourceUnavailable:
            raise
        except Exception as exc:
            # the studies being retrieved lose this attempt; those already complete here are still checked
            recorded = {plan[0]: plan[3] for plan in plans}
            fetching = {plan[0] for plan in plans if plan[4]} if plans else {row[0] for row in rows}
            for row_id, study_uid, _, attempts in rows:
                if row_id in fetching:
                    self._failed_attempt(row_id, study_uid, recorded.get(row_id, attempts),
                                         f"{type(exc).__name__}: {exc}"[:500])
            plans = [plan for plan in plans if not plan[4]]
            if not plans:
                return

        def check() -> None:
            with self._writing() as session:
                for row_id, study_uid, expected, attempts, _ in plans:
                    if raised:
                        ledger.set_study(session, row_id, expected=expected)
                    study_id, received = ledger.received_count(session, study_uid)
                    self._check(session, row_id, study_uid, study_id, expected, received, attempts)

        if later is None:
            check()
        else:
            later(check)

    def _failed_attempt(self, row_id: int, study_uid: str, attempts: int, error: str) -> None:
        attempts = max(attempts, 1)
        final = attempts >= MAX_ATTEMPTS
        log.warning("sweep %d: study %s attempt %d failed%s: %s", self.sweep_id, study_uid, attempts,
                    " for good" if final else "", error)
        with session_scope(self.url) as session:
            ledger.set_study(session, row_id, attempts=attempts, error=error,
                             state=str(SweepStudyState.FAILED if final else SweepStudyState.COUNTED))

    def _check(self, session: Connection, row_id: int, study_uid: str, study_id: int | None, expected: int, received: int,
               attempts: int) -> None:
        """Release a complete study; retry a short one; release a still-short one as incomplete."""
        if expected > 0 and received >= expected:
            ledger.release(session, row_id, study_id or 0, SweepStudyState.RELEASED, received, None)
            return
        short = f"received {received} of {expected} instances"
        if attempts < MAX_ATTEMPTS:
            log.info("sweep %d: study %s: %s; retrying", self.sweep_id, study_uid, short)
            ledger.set_study(session, row_id, state=str(SweepStudyState.COUNTED), received=received, error=short)
            return
        if study_id is None or received == 0:
            ledger.set_study(session, row_id, state=str(SweepStudyState.FAILED), received=received,
                             error=f"{short} after {attempts} attempts")
            return
        log.warning("sweep %d: study %s incomplete: %s after %d attempts; drafting what arrived", self.sweep_id,
                    study_uid, short, attempts)
        ledger.release(session, row_id, study_id, SweepStudyState.INCOMPLETE, received,
                       f"incomplete: {short} after {attempts} attempts")


class Sweeps:
    """This process's runners and schedule bookkeeping (one per coordinator process)."""

    def __init__(self) -> None:
        self.runners: dict[int, SweepRunner] = {}
        self.last_schedule_check: datetime | None = None
        self.last_claim = float("-inf")
        self.lock = threading.Lock()

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.stop_event.set()


_STATE = Sweeps()


def start_scheduled(settings: Settings, sources: list[AnySource], schedule: str, now: datetime | None = None) -> list[int]:
    """Create the sweeps of the previous day for every source, if the schedule fired lately and nobody did yet."""
    cron = parse_cron(schedule)
    local = (now or datetime.now().astimezone()).replace(second=0, microsecond=0)
    fired = cron.previous(local, horizon=SCHEDULE_GRACE)
    if fired is None:
        return []
    day = fired.date() - timedelta(days=1)
    created = []
    with session_scope(settings.effective_database_url) as session:
        for source in sources:
            key = f"{source.name}@{fired:%Y-%m-%dT%H:%M}"
            sweep_id = ledger.create_sweep(session, source.name, day, day, schedule_key=key)
            if sweep_id is not None:
                created.append(sweep_id)
                log.info("scheduled sweep %d of %s for %s (%s)", sweep_id, source.name, day, schedule)
    return created


def run_sweeps_once(settings: Settings, state: Sweeps = _STATE) -> int:
    """One coordinator pass over sweeps: schedule, claim, start runners; returns runners started.

    Never raises: a failure is logged and the coordinator's other work in the pass goes on.
    """
    try:
        return _run_sweeps_once(settings, state)
    except Exception as exc:  # database briefly away, a bad schedule ...: logged, tried again next pass
        log.warning("sweep pass failed: %s: %s", type(exc).__name__, str(exc)[:300])
        return 0


def _run_sweeps_once(settings: Settings, state: Sweeps) -> int:
    env = SweepEnv()
    try:
        sources = load_sources(settings)
    except SourceError as exc:
        log.error("%s", exc)
        return 0
    window_text = getattr(settings, "sweep_window", None) or env.sweep_window
    schedule = getattr(settings, "sweep_schedule", None) or env.sweep_schedule
    with state.lock:
        now = time.monotonic()
        if now - state.last_claim < CLAIM_EVERY_S:
            return 0
        state.last_claim = now
        minute = utcnow().replace(second=0, microsecond=0)
        if schedule and sources and state.last_schedule_check != minute:
            state.last_schedule_check = minute
            start_scheduled(settings, sources, schedule)
        with session_scope(settings.effective_database_url) as session:
            ours = ledger.claim(session, OWNER, LEASE_S)
            names = ledger.source_names(session, ours)
        for sweep_id in [i for i, r in state.runners.items() if not r.is_alive()]:
            del state.runners[sweep_id]
        started = 0
        for sweep_id in ours:
            if sweep_id in state.runners:
                continue
            try:
                source = find_source(sources, names[sweep_id])
                window = parse_window(window_text)
            except (SourceError, ValueError) as exc:
                with session_scope(settings.effective_database_url) as session:
                    ledger.change_state(session, sweep_id, SweepState.FAILED, ledger.ACTIVE)
                    ledger.set_sweep(session, sweep_id, error=str(exc))
                log.error("sweep %d cannot run: %s", sweep_id, exc)
                continue
            runner = SweepRunner(sweep_id, settings, source, window)
            state.runners[sweep_id] = runner
            runner.start()
            started += 1
        return started

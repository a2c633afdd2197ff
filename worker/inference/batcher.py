"""A dynamic batcher: many submitting threads, one model thread.

Requests carry a kind (e.g. ``"draft"`` or ``"probe"``: only requests of one
kind share a batch), a prompt length and a row count. The model thread runs a
batch as soon as one length bucket of a kind holds its row limit, or when
the oldest waiting request is ``max_wait_ms`` old; a batch is filled with the
requests of that kind closest in length to the oldest one, so padding stays
small. Results come back through :class:`concurrent.futures.Future`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Runs one batch: (kind, payloads) -> one result per payload, in order.
BatchFn = Callable[[Hashable, list[Any]], Sequence[Any]]


@dataclass
class _Pending:
    kind: Hashable
    payload: Any
    length: int
    rows: int
    future: Future[Any]
    submitted: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Collects requests from threads; one daemon thread runs them in batches."""

    def __init__(
        self,
        run_batch: BatchFn,
        max_rows: int = 8,
        max_wait_ms: float = 5.0,
        length_bucket: int = 128,
        name: str = "model-batcher",
        row_limit: Callable[[Hashable], int] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_rows = max(1, max_rows)
        self._row_limit = row_limit
        self.max_wait = max_wait_ms / 1000.0
        self.length_bucket = max(1, length_bucket)
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: Hashable, payload: Any, length: int, rows: int = 1) -> Future[Any]:
        """Queue one request; its future resolves to the batch function's result for it."""
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._pending.append(_Pending(kind, payload, length, max(1, rows), future))
            self._cond.notify()
        return future

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop after the queued requests have run."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def limit(self, kind: Hashable) -> int:
        """Most rows in one batch of this kind."""
        return max(1, self._row_limit(kind)) if self._row_limit else self.max_rows

    # --- model thread ------------------------------------------------------------------
    def _full_group(self) -> list[_Pending] | None:
        """A (kind, length bucket) group that fills a batch, if any."""
        groups: dict[tuple[Hashable, int], list[_Pending]] = {}
        for item in self._pending:
            group = groups.setdefault((item.kind, item.length // self.length_bucket), [])
            group.append(item)
            if sum(i.rows for i in group) >= self.limit(item.kind):
                return self._take(group)
        return None

    def _take(self, candidates: list[_Pending]) -> list[_Pending]:
        """Up to the kind's row limit from ``candidates`` (in order; always at least one request)."""
        chosen: list[_Pending] = []
        rows = 0
        most = self.limit(candidates[0].kind)
        for item in candidates:
            if chosen and rows + item.rows > most:
                continue
            chosen.append(item)
            rows += item.rows
            if rows >= most:
                break
        return chosen

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch is due; None when closed and drained."""
        with self._cond:
            while True:
                if self._pending:
                    full = self._full_group()
                    if full is not None:
                        break
                    oldest = min(self._pending, key=lambda i: i.submitted)
                    wait = oldest.submitted + self.max_wait - time.monotonic()
                    if wait <= 0 or self._closed:
                        same = [i for i in self._pending if i.kind == oldest.kind and i is not oldest]
                        same.sort(key=lambda i: (abs(i.length - oldest.length), i.submitted))
                        full = self._take([oldest, *same])
                        break
                    self._cond.wait(wait)
                elif self._closed:
                    return None
                else:
                    self._cond.wait()
            taken = {id(i) for i in full}
            self._pending = [i for i in self._pending if id(i) not in taken]
            return full

    def _loop(self) -> None:
        _name_os_thread(self._thread.name)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [i for i in batch if i.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._run_batch(live[0].kind, [i.payload for i in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} requests")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                log.exception("batch of %d %s requests failed", len(live), live[0].kind)
                for item in live:
                    item.future.set_exception(exc)
                continue
            self.batches_run += 1
            self.batch_sizes.append(sum(i.rows for i in live))
            for item, result in zip(live, results, strict=True):
                item.future.set_result(result)


def _name_os_thread(name: str) -> None:
    """Give the model thread its name in the OS too (``/proc/<pid>/task/<tid>/comm``, top -H).

    Operators and ``bench/pipeline.py`` use it to tell the CPU spent in the model
    from the rest of a preread.worker's CPU. Linux only; elsewhere a no-op.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass

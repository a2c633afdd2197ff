"""Heartbeat rows on Postgres and SQLite: one per process, what status says of them, recheck requests kept."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update

from preread.schemas.database import session_scope
from preread.schemas.tables import Heartbeat, ProcessRole, ProcessState, utcnow
from preread.worker.pipeline.heartbeat import HeartbeatWriter, recheck_requested, request_recheck, seen, warnings
from preread.worker.pipeline.queues import QUEUES


def test_one_row_per_process_and_what_status_says(db_url: str) -> None:
    assert warnings(seen(db_url), QUEUES, need_export=False) == [
        "no coordinator seen in the last 60 s: run `preread coordinate` (or `preread run`); "
        "without it nothing lost is re-enqueued",
        "no worker for the render queue seen in the last 60 s: run `preread worker --queues render`",
        "no worker for the infer queue seen in the last 60 s: run `preread worker --queues infer`",
    ]
    coordinator = HeartbeatWriter(db_url, ProcessRole.COORDINATOR, state=ProcessState.READY)
    worker = HeartbeatWriter(db_url, ProcessRole.WORKER, queues="render,infer")
    assert coordinator.beat() and worker.beat() and worker.beat()
    worker.mark(ProcessState.NOT_READY, "model folder /nope does not exist (device cpu); set PREREAD_MODEL=/path/to/folder")
    with session_scope(db_url) as session:
        assert session.execute(select(func.count()).select_from(Heartbeat)).scalar_one() == 2, "upserted, not appended"
    assert warnings(seen(db_url), QUEUES, need_export=True) == [
        "no ready infer worker: model folder /nope does not exist (device cpu); set PREREAD_MODEL=/path/to/folder",
        "no worker for the export queue seen in the last 60 s: run `preread worker --queues export`",
    ]
    with session_scope(db_url) as session:  # the coordinator went silent two minutes ago
        session.execute(update(Heartbeat).where(Heartbeat.role == "coordinator").values(last_seen=utcnow() - timedelta(minutes=2)))
    assert [p.role for p in seen(db_url)] == ["worker"]
    worker.stop()
    assert seen(db_url) == [], "a process that stopped cleanly is not counted as running"


def test_a_recheck_request_survives_the_next_beat(db_url: str) -> None:
    worker = HeartbeatWriter(db_url, ProcessRole.WORKER, queues="infer")
    worker.mark(ProcessState.NOT_READY, "no model")
    checked_at = utcnow() - timedelta(seconds=1)
    assert request_recheck(db_url) == 1
    worker.beat()  # the worker's own beat rewrites its details
    assert recheck_requested(db_url, checked_at), "the request of `preread retry` was kept"
    assert not recheck_requested(db_url, utcnow()), "an older request does not count again"

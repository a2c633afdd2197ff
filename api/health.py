"""Readiness: the database, the broker, and the heartbeats of a listener, a coordinator and each queue's workers."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from preread.api.models import Check, Readiness
from preread.schemas.settings import Settings
from preread.schemas.tables import Heartbeat, ProcessRole, ProcessState, utcnow
from preread.worker.pipeline.queues import EXPORT, INFER, RENDER

#: A process not seen for this long is taken to be gone.
SEEN_WITHIN = timedelta(seconds=60)
BROKER_TIMEOUT_S = 1.0


def check_database(session: Session) -> Check:
    """The database answers a query."""
    try:
        session.execute(text("SELECT 1"))
        return Check(name="database", ok=True, detail="answers")
    except Exception as exc:
        session.rollback()
        return Check(name="database", ok=False, detail=f"PREREAD_DATABASE_URL does not answer ({type(exc).__name__})")


def check_broker(settings: Settings) -> Check:
    """The broker accepts a connection (the embedded file queue: its folder exists)."""
    url = settings.broker_url
    if not url:
        folder = settings.data_dir / "queue"
        ok = folder.is_dir()
        return Check(name="broker", ok=ok, detail="embedded file queue" if ok else f"queue folder {folder} is missing; start `preread run`")
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=BROKER_TIMEOUT_S, socket_timeout=BROKER_TIMEOUT_S)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=BROKER_TIMEOUT_S) as conn:
                conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
        return Check(name="broker", ok=True, detail="answers")
    except Exception as exc:
        return Check(name="broker", ok=False, detail=f"PREREAD_BROKER_URL does not answer ({type(exc).__name__}); start the broker or fix the URL")


def _heartbeat_check(name: str, rows: list[Heartbeat], what: str) -> Check:
    ready = [r for r in rows if r.state == ProcessState.READY]
    if ready:
        return Check(name=name, ok=True, detail=f"{len(ready)} ready")
    if rows:
        reasons = "; ".join(sorted({r.reason or r.state for r in rows}))
        return Check(name=name, ok=False, detail=f"{what} seen but not ready: {reasons}")
    return Check(name=name, ok=False, detail=f"no {what} seen in the last {int(SEEN_WITHIN.total_seconds())} s")


def check_processes(session: Session, settings: Settings) -> list[Check]:
    """A ready listener, coordinator, and worker for each queue in use, from the heartbeat table."""
    rows = list(session.scalars(select(Heartbeat).where(Heartbeat.last_seen >= utcnow() - SEEN_WITHIN)))
    checks = [
        _heartbeat_check("listener", [r for r in rows if r.role == ProcessRole.LISTENER], "listener"),
        _heartbeat_check("coordinator", [r for r in rows if r.role == ProcessRole.COORDINATOR], "coordinator"),
    ]
    queues = [RENDER, INFER] + ([EXPORT] if settings.export_enabled else [])
    for queue in queues:
        workers = [r for r in rows if r.role == ProcessRole.WORKER and queue in (r.queues or "").split(",")]
        checks.append(_heartbeat_check(f"worker:{queue}", workers, f"worker for queue '{queue}'"))
    return checks


def readiness(session: Session, settings: Settings) -> Readiness:
    """Every check, and whether all passed."""
    checks = [check_database(session), check_broker(settings)]
    if checks[0].ok:
        checks += check_processes(session, settings)
    return Readiness(ready=all(c.ok for c in checks), checks=checks)

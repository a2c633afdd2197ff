"""Engines, sessions and migrations for Postgres and the embedded SQLite file."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:
    from alembic.config import Config


def migrations_dir() -> Path:
    """The Alembic environment, installed as the package data ``preread.migrations`` (the repository's ``alembic/``)."""
    import importlib.util

    spec = importlib.util.find_spec("preread.migrations")
    locations = [Path(p) for p in (spec.submodule_search_locations or []) if Path(p).is_dir()] if spec else []
    for location in locations:
        if (location / "env.py").is_file():
            return location
    raise RuntimeError("the migrations (package data preread.migrations) are not installed; reinstall infimed-preread")


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """Durable, concurrent SQLite: WAL, full fsync, foreign keys, wait on locks."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_normal_sync(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """WAL commits without fsync: safe against a killed process, not against power loss."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _postgres_async_commit(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """Commits that do not wait for the WAL flush: safe against a killed client, not a server crash."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET synchronous_commit = off")
        cursor.close()
    finally:
        dbapi_connection.autocommit = autocommit


def make_engine(url: str, *, sync_writes: bool = True, pre_ping: bool = True, autocommit: bool = False) -> Engine:
    """An engine for ``url``; SQLite gets its folder created and safe pragmas.

    ``sync_writes=False`` (the listener with ``PREREAD_SYNC_WRITES=false``)
    makes every commit of this engine durable against a killed process but
    not against an OS crash or power loss: SQLite ``synchronous=NORMAL``
    (WAL), Postgres ``synchronous_commit=off`` for its sessions.
    ``pre_ping=False`` skips the round trip that tests a server connection
    on each checkout (for callers that retry on a dead connection themselves).
    ``autocommit=True`` runs every statement in its own transaction.
    """
    isolation = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **isolation)
        event.listen(engine, "connect", _sqlite_pragmas)
        if not sync_writes:
            event.listen(engine, "connect", _sqlite_normal_sync)
        return engine
    engine = create_engine(url, pool_pre_ping=pre_ping, **isolation)
    if not sync_writes and engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgres_async_commit)
    return engine


#: A pooled server connection back within this many seconds is not pinged on checkout (unless its socket has news).
PING_IDLE_SECONDS = 10.0


def _has_news(dbapi_connection: DBAPIConnection) -> bool:
    """Whether an idle connection's socket is readable: the server said something unasked (it is going away)."""
    try:
        return bool(select.select([dbapi_connection.fileno()], [], [], 0)[0])
    except (OSError, ValueError, AttributeError):
        return True


def _ping_when_idle(engine: Engine) -> None:
    """Pre-ping only connections idle over PING_IDLE_SECONDS or whose socket is readable.

    A connection that was in use a moment ago and whose server has not hung up
    (a restarted server closes its sockets, which makes them readable) is used
    without the extra round trip; any other is pinged, and a dead one replaced.
    """

    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry, _proxy: object) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or (time.monotonic() - since < PING_IDLE_SECONDS and not _has_news(dbapi_connection)):
            return  # just connected, or just used and quiet
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("the database connection is gone; reconnecting") from exc


def views_engine(url: str) -> Engine:
    """An engine for the API's audited reads: autocommit, commits without the flush wait, pinged when idle.

    Autocommit spares each request its BEGIN and COMMIT round trips: a view's reads
    see committed data statement by statement (as READ COMMITTED does inside a
    transaction) and its one write, the audit row, commits on its own, like
    ``sync_writes=False`` (survives a killed API, not a crashed server or power loss).
    """
    engine = make_engine(url, sync_writes=False, pre_ping=False, autocommit=True)
    if engine.dialect.name != "sqlite":
        _ping_when_idle(engine)
    return engine


@lru_cache(maxsize=8)
def engine_for(url: str, *, sync_writes: bool = True, pre_ping: bool = True) -> Engine:
    """One engine per URL (and durability mode, and pinging) per process."""
    return make_engine(url, sync_writes=sync_writes, pre_ping=pre_ping)


def session_factory(url: str) -> sessionmaker[Session]:
    """A session factory bound to the engine for ``url``."""
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our migrations and ``url``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)

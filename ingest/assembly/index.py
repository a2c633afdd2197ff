"""The listener's instance index writer: one short transaction per received instance.

The first instance of a series goes through :func:`ingest.catalog.record_instance`
(study and series upserted from their DICOM attributes). The study and
series ids are then remembered, so every further instance of that series is
two statements (insert the instance, touch the study) in one transaction,
sent as fixed SQL text on the driver's own connection (SQLite and psycopg),
without SQLAlchemy's per-statement compile and result machinery: the ingest
hot path is a few tens of microseconds of Python plus the commit. Both
statements are the catalog's own (:func:`~preread.ingest.assembly.catalog.insert_instance`,
:func:`~preread.ingest.assembly.catalog.receive_study`), compiled to that SQL once.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, bindparam, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.dml import UpdateBase

from preread.ingest.assembly.catalog import (
    INSTANCE_COLUMNS,
    INSTANCES,
    InstanceIdentity,
    insert_instance,
    instance_row,
    receive_study,
    record_instance,
)
from preread.schemas.tables import Series, UTCDateTime, utcnow

#: Series whose ids are remembered, per process.
CACHE_SIZE = 4096



#: :func:`~preread.ingest.assembly.catalog.receive_study` with its two values as named parameters.
_TOUCH = receive_study(bindparam("b_study_id"), bindparam("b_now", type_=UTCDateTime()))




def _qmark_sql(statement: UpdateBase, columns: Sequence[str] | None = None) -> tuple[str, tuple[str, ...]]:
    """``statement`` (with values for ``columns``) as plain SQL, valid on SQLite and Postgres, with ``?``
    placeholders; and the parameter names in their order."""
    compiled = statement.compile(dialect=sqlite.dialect(paramstyle="qmark"), column_keys=columns)
    return compiled.string, tuple(compiled.positiontup or ())


class WriterLock:
    """Serialises this process's and sibling processes' writes to one SQLite file.

    SQLite admits one writer at a time and makes the others poll with sleeps
    of up to 100 ms (busy_timeout); a blocking ``flock`` on a lock file beside
    the database hands the turn over at once instead. Postgres needs none.
    """

    def __init__(self, database_path: Path | None) -> None:
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        if database_path is not None:
            database_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(f"{database_path}.writer.lock", os.O_RDWR | os.O_CREAT, 0o640)

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def writer_lock(engine: Engine) -> WriterLock | _NoLock:
    """A :class:`WriterLock` for a SQLite file, nothing for a server database."""
    if engine.dialect.name != "sqlite":
        return _NoLock()
    database = engine.url.database
    if not database or database == ":memory:":
        return WriterLock(None)
    return WriterLock(Path(database).resolve())


class InstanceIndex:
    """Writes instance rows; safe to share between the listener's association threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        #: the SQLite file's writer turn (nothing on Postgres); the listener's other writers take it too
        self.writer = writer_lock(engine)
        self._ids: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()
        dialect = engine.dialect.name
        self._insert = insert_instance(dialect)
        # the same two statements as driver SQL, for the drivers we know the parameter style of
        mark = {"sqlite": "?", "postgresql": "%s"}.get(dialect) if engine.dialect.driver in ("pysqlite", "psycopg") else None
        self._raw = mark is not None
        self._postgres = self._raw and dialect == "postgresql"
        self._insert_sql = _INSERT_SQL.replace("?", mark) if mark else ""
        self._touch_sql = _TOUCH_SQL.replace("?", mark) if mark else ""
        self._record_sql = _RECORD_SQL.replace("?", mark) if mark else ""
        self._stamp = INSTANCES.c.received_at.type.bind_processor(engine.dialect) or (lambda value: value)
        dbapi = engine.dialect.loaded_dbapi if self._raw else None
        self._integrity_error: type[Exception] = IntegrityError
        self._disconnect_errors: tuple[type[Exception], ...] = ()
        if dbapi is not None:
            self._integrity_error = dbapi.IntegrityError
            if self._postgres:
                self._disconnect_errors = (dbapi.OperationalError, dbapi.InterfaceError)

    def record(
        self,
        ds: Dataset,
        ident: InstanceIdentity,
        path: Path,
        size: int,
        transfer_syntax: str,
        full_header: Callable[[], Dataset] | None = None,
    ) -> bool:
        """Index one stored instance and commit; returns whether the instance row is new.

        ``ds`` needs the identity UIDs, InstanceNumber and NumberOfFrames;
        ``full_header`` (if given) supplies the complete header for the first
        instance of a series, whose study and series rows take their
        attributes from it.
        """
        key = (ident.study_uid, ident.series_uid)
        with self._lock:
            ids = self._ids.get(key)
        if ids is not None:
            fast = self._record_fast(ds, ident, ids, path, size, transfer_syntax)
            if fast is not None:
                return fast
        header = full_header() if full_header is not None else ds
        for attempt in (1, 2):
            try:
                with self.writer, Session(self.engine) as session, session.begin():
                    study_id, new = record_instance(session, header, path, size, transfer_syntax_uid=transfer_syntax,
                                                     ident=ident)
                    series_id = session.execute(
                        select(Series.id).where(Series.series_instance_uid == ident.series_uid)
                    ).scalar_one()
                break
            except DBAPIError as exc:  # a dead pooled connection (no ping on checkout): once more on a new one
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        with self._lock:
            self._ids[key] = (study_id, series_id)
            while len(self._ids) > CACHE_SIZE:
                self._ids.popitem(last=False)
        return new

    def _record_fast(
        self, ds: Dataset, ident: InstanceIdentity, ids: tuple[int, int], path: Path, size: int, transfer_syntax: str
    ) -> bool | None:
        """Insert the instance and, if new, touch its known study; ``None`` when the cached rows are gone.

        The study row is updated last, so its lock is held only until the commit.
        """
        study_id, series_id = ids
        now = utcnow()
        if self._raw:
            return self._record_raw(ds, ident, ids, path, size, transfer_syntax, now)
        try:
            with self.writer, self.engine.begin() as conn:
                new = self._insert_row(conn, ds, ident, series_id, path, size, transfer_syntax, now)
                if new and conn.execute(_TOUCH, {"b_study_id": study_id, "b_now": now}).rowcount != 1:
                    raise _Stale
                return new
        except (_Stale, IntegrityError):  # study or series deleted since it was cached
            with self._lock:
                self._ids.pop((ident.study_uid, ident.series_uid), None)
            return None

    def _record_raw(
        self, ds: Dataset, ident: InstanceIdentity, ids: tuple[int, int], path: Path, size: int, transfer_syntax: str,
        now: datetime,
    ) -> bool | None:
        """:meth:`_record_fast` with driver SQL on a pooled driver connection.

        SQLite: one transaction of two statements under the writer lock.
        Postgres: one statement in autocommit (insert and touch in one
        ``WITH``), so one round trip per instance. A connection found dead
        (the index engine does not ping on checkout) is dropped and the
        instance tried once more on a new one; the insert is idempotent.
        """
        study_id, series_id = ids
        stamp = self._stamp(now)
        if not self._postgres and isinstance(stamp, datetime):
            stamp = stamp.isoformat(" ")  # what sqlite3's default adapter would make of it, without the adapter
        values = instance_row(ds, ident, series_id, path, size, transfer_syntax, stamp)
        row = tuple(values[name] for name in _INSERT_PARAMS)
        values = {"b_now": stamp, "b_study_id": study_id}
        touch = tuple(values[name] for name in _TOUCH_PARAMS)
        for attempt in (1, 2):
            try:
                with self.writer:
                    conn = self.engine.raw_connection()
                    try:
                        if self._postgres:
                            new = self._postgres_once(conn, row + touch)
                        else:
                            new = self._sqlite_once(conn, row, touch)
                    except self._disconnect_errors:
                        conn.invalidate()
                        if attempt == 2:
                            raise
                        continue
                    finally:
                        conn.close()  # back to the pool (a no-op after invalidate)
                return new
            except (_Stale, self._integrity_error):  # study or series deleted since it was cached
                break
        with self._lock:
            self._ids.pop((ident.study_uid, ident.series_uid), None)
        return None

    def _sqlite_once(self, conn: PoolProxiedConnection, row: tuple[object, ...], touch: tuple[object, ...]) -> bool:
        cursor = conn.cursor()
        try:
            cursor.execute(self._insert_sql, row)
            new = bool(cursor.fetchall())
            if new:
                cursor.execute(self._touch_sql, touch)
                if cursor.rowcount != 1:
                    raise _Stale
            conn.commit()
            return new
        except BaseException:
            conn.rollback()
            raise
        finally:
            cursor.close()

    def _postgres_once(self, conn: PoolProxiedConnection, params: tuple[object, ...]) -> bool:
        driver = conn.driver_connection
        if driver is None:
            raise _Stale  # a connection already invalidated: the slow path takes a new one
        driver.autocommit = True  # the statement is its own transaction: no BEGIN, no COMMIT round trips
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(self._record_sql, params)
                inserted, touched = cursor.fetchone() or (0, 0)
            finally:
                cursor.close()
        finally:
            driver.autocommit = False  # as the pool and SQLAlchemy sessions expect it
        if inserted and not touched:
            raise _Stale  # cannot happen while series rows cascade with their study; the slow path repairs it
        return bool(inserted)

    def _insert_row(
        self, conn: Connection, ds: Dataset, ident: InstanceIdentity, series_id: int, path: Path, size: int,
        transfer_syntax: str, now: datetime,
    ) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING of the instance row."""
        result = conn.execute(self._insert, instance_row(ds, ident, series_id, path, size, transfer_syntax, now))
        return result.first() is not None


#: :func:`~preread.ingest.assembly.catalog.insert_instance` as driver SQL (``?`` becomes the driver's placeholder).
_INSERT_SQL, _INSERT_PARAMS = _qmark_sql(insert_instance("sqlite"), INSTANCE_COLUMNS)
#: :data:`_TOUCH` as driver SQL: every CASE sees the row as it was before this UPDATE.
_TOUCH_SQL, _TOUCH_PARAMS = _qmark_sql(_TOUCH)

#: Postgres: the insert and, for a new row, the touch as one statement; returns (rows inserted, studies touched).
_RECORD_SQL = (
    f"WITH ins AS ({_INSERT_SQL}), upd AS ({_TOUCH_SQL} AND EXISTS (SELECT 1 FROM ins) RETURNING studies.id) "
    "SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd)"
)


class _Stale(Exception):
    """The cached study row no longer exists."""

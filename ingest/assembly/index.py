"""The listener's instance index writer: one short transaction per received instance.

The first instance of a series goes through :func:`ingest.catalog.record_instance`
(study and series upserted from their DICOM attributes). The study and
series ids are then remembered, so every further instance of that series is
two statements (insert the instance, touch the study) in one transaction,
sent as fixed SQL text on the driver's own connection (SQLite and psycopg),
without SQLAlchemy's per-statement compile and result machinery: the ingest
hot path is a few tens of microseconds of Python plus the commit.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Engine, bindparam, case, null, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from preread.ingest.assembly.catalog import InstanceIdentity, int_attribute, record_instance
from preread.schemas.tables import Instance, Series, Study, StudyState, UTCDateTime, utcnow

#: Series whose ids are remembered, per process.
CACHE_SIZE = 4096

_studies = Study.__table__
_instances = Instance.__table__


def _touch_study():  # type: ignore[no-untyped-def]
    """UPDATE that marks a study as just receiving; re-opens it if it had moved on.

    The CASE is evaluated on the row as this UPDATE locks it, so a study a
    stability monitor flipped a moment ago is re-opened too.
    """
    now = bindparam("b_now", type_=UTCDateTime())
    reopen = _studies.c.state != StudyState.RECEIVING.value
    return (
        update(_studies)
        .where(_studies.c.id == bindparam("b_study_id"))
        .values(
            last_received_at=now,
            updated_at=now,
            state=StudyState.RECEIVING.value,
            state_changed_at=case((reopen, now), else_=_studies.c.state_changed_at),
            error=case((reopen, null()), else_=_studies.c.error),
        )
    )


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
        self._writer = writer_lock(engine)
        self._ids: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()
        dialect = engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._touch = _touch_study()
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT that the dialect made RETURNING
        self._insert = (
            insert(_instances).on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(_instances.c.id)
        )
        # the same two statements as driver SQL, for the drivers we know the parameter style of
        mark = {"sqlite": "?", "postgresql": "%s"}.get(dialect) if engine.dialect.driver in ("pysqlite", "psycopg") else None
        self._raw = mark is not None
        self._postgres = self._raw and dialect == "postgresql"
        self._insert_sql = _INSERT_SQL.replace("?", mark) if mark else ""
        self._touch_sql = _TOUCH_SQL.replace("?", mark) if mark else ""
        self._record_sql = _RECORD_SQL.replace("?", mark) if mark else ""
        self._stamp = _instances.c.received_at.type.bind_processor(engine.dialect) or (lambda value: value)
        dbapi = engine.dialect.loaded_dbapi if self._raw else None
        self._integrity_error: type[Exception] = dbapi.IntegrityError if dbapi is not None else IntegrityError
        self._disconnect_errors: tuple[type[Exception], ...] = (
            (dbapi.OperationalError, dbapi.InterfaceError) if self._postgres else ()
        )

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
            new = self._record_fast(ds, ident, ids, path, size, transfer_syntax)
            if new is not None:
                return new
        header = full_header() if full_header is not None else ds
        for attempt in (1, 2):
            try:
                with self._writer, Session(self.engine) as session, session.begin():
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
            with self._writer, self.engine.begin() as conn:
                new = self._insert_row(conn, ds, ident, series_id, path, size, transfer_syntax, now)
                if new and conn.execute(self._touch, {"b_study_id": study_id, "b_now": now}).rowcount != 1:
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
        row = (
            series_id, ident.sop_instance_uid, ident.sop_class_uid, transfer_syntax, int_attribute(ds, "InstanceNumber"),
            int_attribute(ds, "NumberOfFrames") or 1, str(path), size, stamp,
        )
        touch = (stamp, stamp, stamp, study_id)
        for attempt in (1, 2):
            try:
                with self._writer:
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

    def _sqlite_once(self, conn, row: tuple[object, ...], touch: tuple[object, ...]) -> bool:  # type: ignore[no-untyped-def]
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

    def _postgres_once(self, conn, params: tuple[object, ...]) -> bool:  # type: ignore[no-untyped-def]
        driver = conn.driver_connection
        driver.autocommit = True  # the statement is its own transaction: no BEGIN, no COMMIT round trips
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(self._record_sql, params)
                inserted, touched = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            driver.autocommit = False  # as the pool and SQLAlchemy sessions expect it
        if inserted and not touched:
            raise _Stale  # cannot happen while series rows cascade with their study; the slow path repairs it
        return bool(inserted)

    def _insert_row(self, conn, ds, ident, series_id, path, size, transfer_syntax, now) -> bool:  # type: ignore[no-untyped-def]
        """INSERT ... ON CONFLICT DO NOTHING of the instance row."""
        result = conn.execute(
            self._insert,
            {
                "series_id": series_id,
                "sop_instance_uid": ident.sop_instance_uid,
                "sop_class_uid": ident.sop_class_uid,
                "transfer_syntax_uid": transfer_syntax,
                "instance_number": int_attribute(ds, "InstanceNumber"),
                "number_of_frames": int_attribute(ds, "NumberOfFrames") or 1,
                "path": str(path),
                "size_bytes": size,
                "received_at": now,
            },
        )
        return result.first() is not None


#: :meth:`InstanceIndex._insert` as driver SQL (``?`` is replaced by the driver's placeholder).
_INSERT_SQL = (
    "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, instance_number, "
    "number_of_frames, path, size_bytes, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id"
)
#: :func:`_touch_study` as driver SQL: every CASE sees the row as it was before this UPDATE.
_RECEIVING = StudyState.RECEIVING.value
_TOUCH_SQL = (
    f"UPDATE studies SET last_received_at = ?, updated_at = ?, state = '{_RECEIVING}', "
    f"state_changed_at = CASE WHEN state <> '{_RECEIVING}' THEN ? ELSE state_changed_at END, "
    f"error = CASE WHEN state <> '{_RECEIVING}' THEN NULL ELSE error END WHERE id = ?"
)

#: Postgres: the insert and, for a new row, the touch as one statement; returns (rows inserted, studies touched).
_RECORD_SQL = (
    f"WITH ins AS ({_INSERT_SQL}), upd AS ({_TOUCH_SQL} AND EXISTS (SELECT 1 FROM ins) RETURNING studies.id) "
    "SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd)"
)


class _Stale(Exception):
    """The cached study row no longer exists."""

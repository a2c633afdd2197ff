"""The listener's instance index writer: one short transaction per received instance.

The first instance of a series goes through :func:`ingest.catalog.record_instance`
(study and series upserted from their DICOM attributes). The study and
series ids are then remembered, so every further instance of that series is
two prepared Core statements (touch the study, insert the instance) in one
transaction: the ingest hot path stays well under a millisecond of Python.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Engine, bindparam, case, null, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ingest.catalog import InstanceIdentity, _int, record_instance
from schemas.tables import Instance, Series, Study, StudyState, UTCDateTime, utcnow

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
        with self._writer, Session(self.engine) as session, session.begin():
            study_id, new = record_instance(session, header, path, size, transfer_syntax_uid=transfer_syntax)
            series_id = session.execute(
                select(Series.id).where(Series.series_instance_uid == ident.series_uid)
            ).scalar_one()
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

    def _insert_row(self, conn, ds, ident, series_id, path, size, transfer_syntax, now) -> bool:  # type: ignore[no-untyped-def]
        """INSERT ... ON CONFLICT DO NOTHING of the instance row."""
        result = conn.execute(
            self._insert,
            {
                "series_id": series_id,
                "sop_instance_uid": ident.sop_instance_uid,
                "sop_class_uid": ident.sop_class_uid,
                "transfer_syntax_uid": transfer_syntax,
                "instance_number": _int(ds, "InstanceNumber"),
                "number_of_frames": _int(ds, "NumberOfFrames") or 1,
                "path": str(path),
                "size_bytes": size,
                "received_at": now,
            },
        )
        return result.first() is not None


class _Stale(Exception):
    """The cached study row no longer exists."""

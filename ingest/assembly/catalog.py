"""The instance index: studies, series and instances rows from DICOM headers.

Shared by every way an instance enters (listener, folder draft, sweeps). Rows
are upserted with ``INSERT ... ON CONFLICT DO NOTHING`` so concurrent
associations and processes never duplicate a study, series or instance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Table, Update, case, literal, literal_column, null, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from preread.schemas.tables import Instance, Series, Study, StudyState, UTCDateTime, utcnow

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidIdentity(ValueError):
    """The dataset lacks a valid Study, Series or SOP Instance UID."""


def is_valid_uid(value: object) -> bool:
    """True for a DICOM UID: digits and dots, no empty component, at most 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


@dataclass(frozen=True, slots=True)
class InstanceIdentity:
    """The UIDs that place an instance in the study/series hierarchy."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def identity_of(ds: Dataset) -> InstanceIdentity:
    """The validated UIDs of ``ds``; raises :class:`InvalidIdentity` naming the bad attribute."""
    values = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        try:
            raw = ds.get(keyword)
        except Exception as exc:  # a malformed element raises on access
            raise InvalidIdentity(f"{keyword} cannot be read: {type(exc).__name__}") from None
        value = str(raw).strip().rstrip("\x00") if raw is not None else ""
        if not is_valid_uid(value):
            raise InvalidIdentity(f"{keyword} is missing or not a valid UID")
        values[keyword] = value
    return InstanceIdentity(
        values["StudyInstanceUID"], values["SeriesInstanceUID"], values["SOPInstanceUID"], values["SOPClassUID"]
    )


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        try:
            value = "\\".join(str(v) for v in value)
        except Exception:
            return None
    text = str(value).strip()
    return text[:limit] or None


_INTEGER_TEXT = re.compile(rb"[ \x00]*[+-]?[0-9]{1,12}[ \x00]*")


def int_attribute(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute, or None when absent or unreadable (IS values can be malformed).

    A still-raw element holding plain integer text is read straight from
    its bytes, without pydicom's conversion (the listener's hot path).
    """
    try:
        raw = ds.get_item(keyword)
    except Exception:
        raw = None
    if raw is not None and isinstance(raw.value, bytes) and _INTEGER_TEXT.fullmatch(raw.value):
        return int(raw.value.strip(b" \x00"))
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None


def _date(ds: Dataset, keyword: str) -> date | None:
    raw = _text(ds, keyword, 16)
    if not raw:
        return None
    try:
        return datetime.strptime(raw[:8], "%Y%m%d").date()
    except ValueError:
        return None


#: DICOM Requested Procedure Priority (0040,1003) values, as urgency ranks.
PRIORITY_RANK = {"STAT": 2, "HIGH": 1, "URGENT": 1, "ASAP": 1, "MEDIUM": 0, "ROUTINE": 0, "LOW": 0}


def requested_priority(ds: Dataset) -> int:
    """The urgency rank the order asked for: Requested Procedure Priority, top level or in the Request Attributes."""
    candidates = [ds]
    try:
        candidates += list(ds.get("RequestAttributesSequence") or [])
    except Exception:
        pass
    rank = 0
    for item in candidates:
        value = (_text(item, "RequestedProcedurePriority", 16) or "").upper()
        rank = max(rank, PRIORITY_RANK.get(value, 0))
    return rank


def _insert(session: Session, table: type[Study] | type[Series] | type[Instance]) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect {dialect}")


#: The studies and instances tables (declarative mapping always makes a Table; ``__table__`` is typed as any FromClause).
STUDIES = cast(Table, Study.__table__)
INSTANCES = cast(Table, Instance.__table__)


#: The columns a new instance row is inserted with.
INSTANCE_COLUMNS = (
    "series_id", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "instance_number", "number_of_frames",
    "path", "size_bytes", "received_at",
)


def insert_instance(dialect: str) -> ReturningInsert[Any]:
    """The one INSERT of an instance row, its values bound by column name (:func:`instance_row`).

    A SOP Instance UID already stored inserts nothing: the first copy wins, and
    the statement returns no id (RETURNING, not rowcount: psycopg reports -1
    for an INSERT that the dialect made RETURNING).
    """
    insert: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        insert = postgresql.insert(INSTANCES)
    elif dialect == "sqlite":
        insert = sqlite.insert(INSTANCES)
    else:
        raise NotImplementedError(f"unsupported database dialect {dialect}")
    return insert.on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(INSTANCES.c.id)


def instance_row(
    ds: Dataset,
    ident: InstanceIdentity,
    series_id: int,
    path: Path,
    size_bytes: int,
    transfer_syntax_uid: str | None,
    received_at: object,
) -> dict[str, object]:
    """The values of a new instance row, by column name (:data:`INSTANCE_COLUMNS`), for :func:`insert_instance`."""
    values = (
        series_id,
        ident.sop_instance_uid,
        ident.sop_class_uid,
        transfer_syntax_uid,
        int_attribute(ds, "InstanceNumber"),
        int_attribute(ds, "NumberOfFrames") or 1,
        str(path),
        size_bytes,
        received_at,
    )
    return dict(zip(INSTANCE_COLUMNS, values, strict=True))


def receive_study(study_id: int | ColumnElement[Any], now: ColumnElement[datetime]) -> Update:
    """The re-open rule, as the one UPDATE of a study row that a new instance makes.

    The study is receiving and its quiet period restarts at ``now``. A study that
    had moved past RECEIVING is re-opened (its state changes now and its error is
    cleared), so a new draft is made once it is stable again; earlier drafts are
    kept. The rule is decided in SQL, on the row as this UPDATE locks it: a
    stability monitor may have made the study STABLE a moment ago.
    """
    receiving: ColumnElement[str] = literal_column(f"'{StudyState.RECEIVING.value}'")
    reopen = STUDIES.c.state != receiving
    return (
        update(STUDIES)
        .where(STUDIES.c.id == study_id)
        .values(
            last_received_at=now,
            updated_at=now,
            state=receiving,
            state_changed_at=case((reopen, now), else_=STUDIES.c.state_changed_at),
            error=case((reopen, null()), else_=STUDIES.c.error),
        )
    )


def upsert_study(session: Session, ds: Dataset, ident: InstanceIdentity, source: str = "listener") -> int:
    """The id of the study row for ``ident``, created from ``ds`` if new."""
    now = utcnow()
    values = dict(
        study_instance_uid=ident.study_uid,
        accession_number=_text(ds, "AccessionNumber", 16),
        patient_id=_text(ds, "PatientID", 64),
        patient_age=_text(ds, "PatientAge", 4),
        patient_sex=_text(ds, "PatientSex", 16),
        study_date=_date(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription", 64),
        modalities=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined", 64),
        source=source,
        state=StudyState.RECEIVING,
        state_changed_at=now,
        first_received_at=now,
        last_received_at=now,
        created_at=now,
        updated_at=now,
        priority=requested_priority(ds),
        attempts=0,
    )
    session.execute(_insert(session, Study).values(**values).on_conflict_do_nothing(index_elements=["study_instance_uid"]))
    return session.execute(select(Study.id).where(Study.study_instance_uid == ident.study_uid)).scalar_one()


def note_new_instance(session: Session, study_id: int, modality: str | None) -> None:
    """A new instance arrived: :func:`receive_study`, and its modality added to the study's."""
    statement = receive_study(study_id, literal(utcnow(), UTCDateTime()))
    modalities = session.execute(select(Study.modalities).where(Study.id == study_id)).scalar_one()
    if modality and modalities and modality not in modalities.split("\\"):
        statement = statement.values(modalities=f"{modalities}\\{modality}"[:64])
    session.execute(statement)


def upsert_series(session: Session, ds: Dataset, ident: InstanceIdentity, study_id: int) -> int:
    """The id of the series row for ``ident``, created from ``ds`` if new."""
    values = dict(
        study_id=study_id,
        series_instance_uid=ident.series_uid,
        modality=_text(ds, "Modality", 16),
        series_number=int_attribute(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        body_part=_text(ds, "BodyPartExamined", 64),
        created_at=utcnow(),
    )
    session.execute(_insert(session, Series).values(**values).on_conflict_do_nothing(index_elements=["series_instance_uid"]))
    return session.execute(select(Series.id).where(Series.series_instance_uid == ident.series_uid)).scalar_one()


def record_instance(
    session: Session,
    ds: Dataset,
    path: Path,
    size_bytes: int,
    *,
    transfer_syntax_uid: str | None = None,
    source: str = "listener",
) -> tuple[int, bool]:
    """Index a stored instance; returns its study id and whether the instance row is new.

    The caller commits. A duplicate SOP Instance UID leaves the existing row
    and the study untouched.
    """
    ident = identity_of(ds)
    study_id = upsert_study(session, ds, ident, source)
    series_id = upsert_series(session, ds, ident, study_id)
    result = session.execute(
        insert_instance(session.get_bind().dialect.name),
        instance_row(ds, ident, series_id, path, size_bytes, transfer_syntax_uid, utcnow()),
    )
    created = result.first() is not None
    if created:
        note_new_instance(session, study_id, _text(ds, "Modality", 16))
    return study_id, created

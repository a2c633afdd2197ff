"""The reading worklist: studies by urgency, then highest probe score, then arrival, a page at a time.

Pages are cut with a keyset cursor on (priority, top probe score, arrival, id),
so a page costs the same at any depth and rows arriving meanwhile never
shift or repeat a page. The order is served by ``ix_studies_worklist``, the
probe filter by ``ix_probe_scores_current_condition`` (matches) and
``ix_probe_scores_current_study`` (one study's scores).

Each shape of query (which filters, a cursor or not, which plan) is built once
with bound parameters and reused: building and keying a statement costs more
than running it.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import ARRAY, Integer, Select, and_, any_, bindparam, exists, func, literal_column, or_, select, table
from sqlalchemy.orm import Session

from preread.schemas.findings import Urgency
from preread.schemas.tables import Feedback, ProbeScore, Report, Study, StudyState

if TYPE_CHECKING:
    from typing import TypeAlias

    #: A select of any columns.
    AnySelect: TypeAlias = Select[*tuple[Any, ...]]

MAX_PAGE = 200


class BadCursor(ValueError):
    """The cursor is not one this API handed out."""


@dataclass(frozen=True, slots=True)
class Filters:
    """The worklist's filters; None means no filter."""

    state: StudyState | None = None
    urgency: Urgency | None = None
    modality: str | None = None
    probe: str | None = None
    min_score: float | None = None
    since: datetime | None = None


def encode_cursor(priority: int, score: float, arrival: datetime, study_id: int) -> str:
    """An opaque cursor after this row."""
    raw = json.dumps([priority, score, arrival.isoformat(), study_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, float, datetime, int]:
    """The row a cursor points after; BadCursor if it was not made by :func:`encode_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        priority, score, arrival, study_id = json.loads(raw)
        return int(priority), float(score), datetime.fromisoformat(arrival), int(study_id)
    except Exception as exc:
        raise BadCursor("cursor is not valid; use next_cursor from the previous page") from exc


#: The most studies a probe filter may match for them to be fetched first and sorted (Postgres).
SELECTIVE_MATCHES = 5000
#: How long a probe filter's choice of plan is kept (it never changes the rows, only how they are found).
PLAN_SECONDS = 30.0


def selective_limit(page_rows: int, studies: float) -> float:
    """Matches up to which fetching them first beats walking the worklist's order.

    Fetching costs one index probe per match; walking costs one per study passed
    before the page fills, about ``page_rows * studies / matches`` if matches were
    spread evenly (they come earlier: a high probe score means a high top score).
    The two meet near ``sqrt(page_rows * studies)``; half of it was the measured
    crossover at 100,000 studies (bench/api.py): 594 matches fetched in 3 ms
    against 23 ms walked, 2,258 walked in 2.5 ms against 14 ms fetched.
    """
    return min(SELECTIVE_MATCHES, 0.5 * math.sqrt(page_rows * max(studies, 0.0)))


@dataclass(frozen=True, slots=True)
class Shape:
    """Which parts a worklist query has: its statement is built once per shape."""

    state: bool
    urgency: bool
    modality: bool
    since: bool
    probe: bool
    min_score: bool
    cursor: bool
    selective: bool


def _probe_matches(min_score: bool) -> Select[int]:
    """Study ids whose current score of the probe is at least ``min_score`` (served by its index)."""
    query = select(ProbeScore.study_id).where(ProbeScore.condition == bindparam("probe"), ProbeScore.current)
    if min_score:
        query = query.where(ProbeScore.score >= bindparam("min_score"))
    return query


@lru_cache(maxsize=4)
def _count_statement(min_score: bool) -> Select[int, float]:
    """The probe filter's matches (counted up to SELECTIVE_MATCHES + 1) and the planner's estimate of the studies."""
    capped = _probe_matches(min_score).limit(SELECTIVE_MATCHES + 1).subquery()
    # The planner's estimate of the table's rows (-1 before its first ANALYZE): no count of 100,000 rows.
    estimate: AnySelect = select(literal_column("reltuples")).select_from(table("pg_class")).where(
        literal_column("oid") == func.to_regclass(Study.__tablename__))
    return select(select(func.count()).select_from(capped).scalar_subquery(), estimate.scalar_subquery())


class Plans:
    """Each probe filter's recent choice of plan, so a refreshing worklist does not count its matches each time."""

    def __init__(self, seconds: float = PLAN_SECONDS) -> None:
        self.seconds = seconds
        self._chosen: dict[tuple[str, float | None, int], tuple[float, bool]] = {}

    def get(self, key: tuple[str, float | None, int]) -> bool | None:
        found = self._chosen.get(key)
        return found[1] if found is not None and time.monotonic() - found[0] < self.seconds else None

    def put(self, key: tuple[str, float | None, int], selective: bool) -> None:
        if len(self._chosen) > 1024:
            self._chosen.clear()
        self._chosen[key] = (time.monotonic(), selective)


def _selective(session: Session, filters: Filters, page_rows: int, plans: Plans | None) -> bool:
    """Whether a probe filter matches few enough studies to fetch them first (Postgres only)."""
    if not filters.probe or session.get_bind().dialect.name != "postgresql":
        return False
    key = (filters.probe, filters.min_score, page_rows)
    chosen = plans.get(key) if plans is not None else None
    if chosen is None:
        matches, studies = session.connection().execute(
            _count_statement(filters.min_score is not None), {"probe": filters.probe, "min_score": filters.min_score}
        ).one()
        chosen = (matches or 0) <= selective_limit(page_rows, float(studies or 0))
        if plans is not None:
            plans.put(key, chosen)
    return chosen


def _filtered(query: AnySelect, shape: Shape) -> AnySelect:
    if shape.state:
        query = query.where(Study.state == bindparam("state"))
    if shape.urgency:
        query = query.where(Study.priority == bindparam("priority"))
    if shape.modality:
        # Studies whose (backslash-separated) modalities include the modality.
        col = Study.modalities
        query = query.where(or_(col == bindparam("modality"), col.like(bindparam("modality_first"), escape="!"),
                                col.like(bindparam("modality_last"), escape="!"),
                                col.like(bindparam("modality_inner"), escape="!")))
    if shape.since:
        query = query.where(Study.first_received_at >= bindparam("since", type_=Study.first_received_at.type))
    if shape.probe and shape.selective:
        # id = ANY(ARRAY(matches)): the few matching studies by primary key, then the top of them sorted.
        query = query.where(Study.id == any_(func.array(_probe_matches(shape.min_score).scalar_subquery())))
    elif shape.probe:
        query = query.where(exists(_probe_matches(shape.min_score).where(ProbeScore.study_id == Study.id)))
    return query


def _after() -> Any:
    """Rows strictly after the cursor in worklist order (priority and score descending, arrival ascending)."""
    p, s = bindparam("after_priority", type_=Integer), bindparam("after_score", type_=Study.top_probe_score.type)
    a, i = bindparam("after_arrival", type_=Study.first_received_at.type), bindparam("after_id", type_=Integer)
    return and_(
        Study.priority <= p,
        or_(
            Study.priority < p,
            Study.top_probe_score < s,
            and_(Study.top_probe_score == s, or_(Study.first_received_at > a, and_(Study.first_received_at == a, Study.id > i))),
        ),
    )


def _parameters(filters: Filters, cursor: tuple[int, float, datetime, int] | None, limit: int) -> dict[str, Any]:
    """The values of a page query's bound parameters."""
    values: dict[str, Any] = {"limit": limit}
    if filters.state is not None:
        values["state"] = str(filters.state)
    if filters.urgency is not None:
        values["priority"] = filters.urgency.rank
    if filters.modality:
        m = filters.modality
        values |= {"modality": m, "modality_first": f"{m}\\%", "modality_last": f"%\\{m}", "modality_inner": f"%\\{m}\\%"}
    if filters.since is not None:
        values["since"] = filters.since
    if filters.probe:
        values["probe"] = filters.probe
        values["min_score"] = filters.min_score
    if cursor is not None:
        values |= dict(zip(("after_priority", "after_score", "after_arrival", "after_id"), cursor, strict=True))
    return values


@dataclass(frozen=True, slots=True)
class ReportBrief:
    """The current report's fields the worklist shows (not its raw output or JSON)."""

    urgency: str | None
    impression: str | None
    parse_status: str


@dataclass(frozen=True, slots=True)
class StudyBrief:
    """The study's fields the worklist shows (read as columns, not as an ORM object)."""

    id: int
    study_instance_uid: str
    accession_number: str | None
    patient_name: str | None
    patient_id: str | None
    modalities: str | None
    study_description: str | None
    state: str
    first_received_at: datetime
    priority: int
    top_probe_score: float
    urgency: str | None


STUDY_COLUMNS = (
    Study.id, Study.study_instance_uid, Study.accession_number, Study.patient_name, Study.patient_id, Study.modalities,
    Study.study_description, Study.state, Study.first_received_at, Study.priority, Study.top_probe_score, Study.urgency,
)
WORKLIST_ORDER = (Study.priority.desc(), Study.top_probe_score.desc(), Study.first_received_at, Study.id)


@dataclass
class Row:
    """A worklist row before it becomes the API's model."""

    study: StudyBrief
    report: ReportBrief | None
    probes: list[tuple[str, float]]
    feedback: str | None


def page(session: Session, filters: Filters, limit: int, cursor: str | None,
         plans: Plans | None = None) -> tuple[list[Row], str | None]:
    """One page of the worklist and the cursor of the next (None on the last page).

    Two statements: the page's studies with their current report and latest verdict
    (the page's ids found first, so only they are joined), then their current probe scores.
    """
    limit = max(1, min(limit, MAX_PAGE))
    after = decode_cursor(cursor) if cursor else None
    postgres = session.get_bind().dialect.name == "postgresql"
    shape = Shape(filters.state is not None, filters.urgency is not None, bool(filters.modality), filters.since is not None,
                  bool(filters.probe), filters.min_score is not None, after is not None,
                  _selective(session, filters, limit + 1, plans))
    rows = _rows(session, _page_statement(shape), _parameters(filters, after, limit + 1), postgres)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more and rows:
        last = rows[-1].study
        next_cursor = encode_cursor(last.priority, last.top_probe_score, last.first_received_at, last.id)
    return rows, next_cursor


@lru_cache(maxsize=256)
def _page_statement(shape: Shape) -> AnySelect:
    keys = _filtered(select(Study.id), shape)
    if shape.cursor:
        keys = keys.where(_after())
    return _rows_statement(keys.order_by(*WORKLIST_ORDER).limit(bindparam("limit", type_=Integer)), WORKLIST_ORDER)


def _rows_statement(keys: AnySelect, order: tuple[Any, ...]) -> AnySelect:
    """The studies ``keys`` selects (ids), in ``order``, with their current report and latest verdict."""
    found = keys.subquery()
    verdict = (select(Feedback.verdict).where(Feedback.study_id == Study.id)
               .order_by(Feedback.id.desc()).limit(1).scalar_subquery())
    return (
        select(*STUDY_COLUMNS, Report.urgency, Report.impression, Report.parse_status, Report.id, verdict)
        .join(found, found.c.id == Study.id)
        .outerjoin(Report, and_(Report.study_id == Study.id, Report.current))
        .order_by(*order)
    )


@lru_cache(maxsize=2)
def _probes_statement(postgres: bool) -> Select[int, str, float]:
    """Current probe scores of the studies ``ids``: one array parameter on Postgres, not a placeholder per id."""
    ids = (ProbeScore.study_id == any_(bindparam("ids", type_=ARRAY(Integer))) if postgres
           else ProbeScore.study_id.in_(bindparam("ids", expanding=True)))
    return select(ProbeScore.study_id, ProbeScore.condition, ProbeScore.score).where(ids, ProbeScore.current)


def rows_for(session: Session, keys: AnySelect, order: tuple[Any, ...]) -> list[Row]:
    """Worklist rows for the studies ``keys`` selects (ids), in ``order``: each with its current report,
    latest verdict and current probe scores (highest first)."""
    return _rows(session, _rows_statement(keys, order), {}, session.get_bind().dialect.name == "postgresql")


def _rows(session: Session, statement: AnySelect, values: dict[str, Any], postgres: bool) -> list[Row]:
    rows: list[Row] = []
    connection = session.connection()  # Core results: plain rows, none of the ORM's per-row work
    for found in connection.execute(statement, values).all():
        report = ReportBrief(found[12], found[13], found[14]) if found[15] is not None else None
        rows.append(Row(StudyBrief(*found[:12]), report, [], found[16]))
    if rows:
        by_id = {r.study.id: r.probes for r in rows}
        for study_id, condition, score in connection.execute(_probes_statement(postgres), {"ids": list(by_id)}).all():
            by_id[study_id].append((condition, score))
        for r in rows:
            r.probes.sort(key=lambda p: -p[1])
    return rows

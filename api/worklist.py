"""The reading worklist: studies by urgency, then highest probe score, then arrival, a page at a time.

Pages are cut with a keyset cursor on (priority, top probe score, arrival, id),
so a page costs the same at any depth and rows arriving meanwhile never
shift or repeat a page. The order is served by ``ix_studies_worklist``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, and_, any_, exists, func, or_, select
from sqlalchemy.orm import Session

from preread.schemas.findings import Urgency
from preread.schemas.tables import Feedback, ProbeScore, Report, Study, StudyState

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


def _modality_match(modality: str):  # type: ignore[no-untyped-def]
    """Studies whose (backslash-separated) modalities include ``modality``."""
    col = Study.modalities
    return or_(
        col == modality,
        col.like(f"{modality}\\%", escape="!"),
        col.like(f"%\\{modality}", escape="!"),
        col.like(f"%\\{modality}\\%", escape="!"),
    )


#: Below this many studies matching a probe filter, the matches are fetched first and sorted (Postgres);
#: above it, the worklist's own order is walked and each study checked (matches come soon).
SELECTIVE_MATCHES = 3000


def _probe_matches(filters: Filters) -> Select:
    """Study ids whose current score of the filter's probe is at least ``min_score`` (served by its index)."""
    query = select(ProbeScore.study_id).where(ProbeScore.condition == filters.probe, ProbeScore.current)
    if filters.min_score is not None:
        query = query.where(ProbeScore.score >= filters.min_score)
    return query


def _selective(session: Session, filters: Filters) -> bool:
    """Whether a probe filter matches few enough studies to fetch them first (Postgres only)."""
    if not filters.probe or session.get_bind().dialect.name != "postgresql":
        return False
    capped = _probe_matches(filters).limit(SELECTIVE_MATCHES + 1).subquery()
    return (session.scalar(select(func.count()).select_from(capped)) or 0) <= SELECTIVE_MATCHES


def _filtered(query: Select, filters: Filters, selective: bool = False) -> Select:
    if filters.state is not None:
        query = query.where(Study.state == str(filters.state))
    if filters.urgency is not None:
        query = query.where(Study.priority == filters.urgency.rank)
    if filters.modality:
        query = query.where(_modality_match(filters.modality))
    if filters.since is not None:
        query = query.where(Study.first_received_at >= filters.since)
    if filters.probe and selective:
        # id = ANY(ARRAY(matches)): the few matching studies by primary key, then the top of them sorted.
        query = query.where(Study.id == any_(func.array(_probe_matches(filters).scalar_subquery())))
    elif filters.probe:
        query = query.where(exists(_probe_matches(filters).where(ProbeScore.study_id == Study.id)))
    return query


def _after(cursor: tuple[int, float, datetime, int]):  # type: ignore[no-untyped-def]
    """Rows strictly after the cursor in worklist order (priority and score descending, arrival ascending)."""
    p, s, a, i = cursor
    return and_(
        Study.priority <= p,
        or_(
            Study.priority < p,
            Study.top_probe_score < s,
            and_(Study.top_probe_score == s, or_(Study.first_received_at > a, and_(Study.first_received_at == a, Study.id > i))),
        ),
    )


@dataclass(frozen=True, slots=True)
class ReportBrief:
    """The current report's fields the worklist shows (not its raw output or JSON)."""

    urgency: str | None
    impression: str | None
    parse_status: str


@dataclass
class Row:
    """A worklist row before it becomes the API's model."""

    study: Study
    report: ReportBrief | None
    probes: list[tuple[str, float]]
    feedback: str | None


def page(session: Session, filters: Filters, limit: int, cursor: str | None) -> tuple[list[Row], str | None]:
    """One page of the worklist and the cursor of the next (None on the last page)."""
    limit = max(1, min(limit, MAX_PAGE))
    query = _filtered(select(Study), filters, _selective(session, filters))
    if cursor:
        query = query.where(_after(decode_cursor(cursor)))
    query = query.order_by(
        Study.priority.desc(), Study.top_probe_score.desc(), Study.first_received_at, Study.id
    ).limit(limit + 1)
    studies = list(session.scalars(query))
    more = len(studies) > limit
    studies = studies[:limit]
    rows = rows_for(session, studies)
    next_cursor = None
    if more and studies:
        last = studies[-1]
        next_cursor = encode_cursor(last.priority, last.top_probe_score, last.first_received_at, last.id)
    return rows, next_cursor


def rows_for(session: Session, studies: list[Study]) -> list[Row]:
    """Worklist rows for ``studies``: each with its current report, current probe scores and latest verdict."""
    ids = [s.id for s in studies]
    reports: dict[int, ReportBrief] = {}
    probes: dict[int, list[tuple[str, float]]] = {i: [] for i in ids}
    verdicts: dict[int, str] = {}
    if ids:
        for study_id, urgency, impression, parse_status in session.execute(
            select(Report.study_id, Report.urgency, Report.impression, Report.parse_status).where(
                Report.study_id.in_(ids), Report.current
            )
        ):
            reports[study_id] = ReportBrief(urgency, impression, parse_status)
        for study_id, condition, score in session.execute(
            select(ProbeScore.study_id, ProbeScore.condition, ProbeScore.score).where(
                ProbeScore.study_id.in_(ids), ProbeScore.current
            )
        ):
            probes[study_id].append((condition, score))
        for study_id, verdict in session.execute(
            select(Feedback.study_id, Feedback.verdict).where(Feedback.study_id.in_(ids)).order_by(Feedback.id)
        ):
            verdicts[study_id] = verdict
    return [Row(s, reports.get(s.id), sorted(probes[s.id], key=lambda p: -p[1]), verdicts.get(s.id)) for s in studies]

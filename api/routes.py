"""The JSON API under /api/v1, plus /healthz, /readyz and /metrics."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic_core import to_json
from sqlalchemy.orm import Session

from preread.api import models
from preread.api.audit import Action, record
from preread.api.auth import READERS, WRITERS, db_session, require, scraper
from preread.api.health import readiness
from preread.api.quality import quality
from preread.api.studies import SEARCH_ORDER, BadUid, NoStudy, add_feedback, find_study, image_path, reprocess, search, study_view
from preread.api.tokens import Principal
from preread.api.urgency import from_rank, urgency_reason
from preread.api.views import Viewer
from preread.api.worklist import BadCursor, Filters, Row, page, rows_for
from preread.schemas.findings import Urgency
from preread.schemas.tables import Study, StudyState
from preread.worker.inference.thresholds import threshold_for

api = APIRouter(prefix="/api/v1")
ops = APIRouter()

Reader = Annotated[Principal, Depends(require(READERS))]
Writer = Annotated[Principal, Depends(require(WRITERS))]
Db = Annotated[Session, Depends(db_session, scope="function")]
StudyUid = Annotated[str, "a Study Instance UID"]


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def study_or_http_error(session: Session, uid: str, *, lock: bool = False) -> Study:
    """The study of ``uid``, or the 422 (not a UID) or 404 (unknown) the API answers for it."""
    try:
        return find_study(session, uid, lock=lock)
    except BadUid as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    except NoStudy as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None


def _json(model: models.BaseModel) -> Response:
    """A model already validated on construction, serialized once (FastAPI would validate it again)."""
    return Response(model.model_dump_json(), media_type="application/json")


URGENCIES = frozenset(u.value for u in Urgency)


def _item(row: Row, threshold: Callable[[str], float]) -> dict[str, Any]:
    """A worklist row as :class:`models.WorklistItem` serializes it: every field, in the model's order."""
    study, report = row.study, row.report
    probes = [{"condition": c, "score": s, "threshold": threshold(c), "positive": s >= threshold(c), "question": None}
              for c, s in row.probes]
    top = row.probes[0] if row.probes else None
    return {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "modality": (study.modalities or "").split("\\")[0] or None,
        "study_description": study.study_description,
        "state": study.state,
        "received_at": study.first_received_at,
        "urgency": str(from_rank(study.priority)),
        "report_urgency": report.urgency if report and report.urgency in URGENCIES else None,
        "urgency_reason": urgency_reason(study.priority, study.urgency, report.urgency if report else None, top),
        "top_probe": probes[0] if probes else None,
        "probes": probes,
        "impression": report.impression if report else None,
        "parse_status": report.parse_status if report else None,
        "feedback": row.feedback,
    }


def _page(request: Request, rows: list[Row], next_cursor: str | None) -> Response:
    """A worklist page as JSON, written straight from the rows' fields.

    The same bytes :class:`models.WorklistPage` would give (tests/api compare them) at a third of the
    cost of building and checking 50 models with 400 probe scores each time the worklist refreshes.
    """
    settings, thresholds = request.app.state.settings, request.app.state.thresholds

    @cache
    def threshold(condition: str) -> float:
        return threshold_for(thresholds, condition, settings).priority

    page_fields = {"items": [_item(r, threshold) for r in rows], "next_cursor": next_cursor}
    return Response(to_json(page_fields), media_type="application/json")


@api.get("/worklist", response_model=models.WorklistPage, summary="The reading worklist, most urgent first")
def worklist(
    request: Request,
    view: Viewer,
    state: StudyState | None = None,
    urgency: Urgency | None = None,
    modality: Annotated[str | None, Query(pattern=r"^[A-Z]{1,16}$", description="e.g. CT, CR")] = None,
    probe: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = None,
    min_score: Annotated[float | None, Query(ge=0.0, le=1.0, description="with probe: its current score at least this")] = None,
    since: Annotated[datetime | None, Query(description="received at or after (ISO 8601, with time zone)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    if min_score is not None and probe is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail="min_score needs probe")
    if since is not None and since.tzinfo is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail="since needs a time zone, e.g. 2026-01-01T00:00:00Z")
    filters = Filters(state=state, urgency=urgency, modality=modality, probe=probe, min_score=min_score, since=since)
    try:
        rows, next_cursor = page(view.session, filters, limit, cursor, request.app.state.plans)
    except BadCursor as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    body = _page(request, rows, next_cursor)
    view.record(Action.WORKLIST, detail=f"{len(rows)} rows")
    return body


@api.post("/search", response_model=models.WorklistPage, summary="Find studies by accession number or patient ID")
def search_studies(request: Request, body: models.SearchRequest, view: Viewer) -> Response:
    rows = rows_for(view.session, search(body), SEARCH_ORDER)
    found = _page(request, rows, None)
    view.record(Action.SEARCH, detail=f"{len(rows)} found")
    return found


@api.get("/studies/{study_uid}", response_model=models.StudyOut, summary="A study, its current draft and history")
def get_study(request: Request, study_uid: StudyUid, view: Viewer) -> Response:
    image_url = request.url_for("get_image", study_uid=study_uid, n="{n}").path.replace("%7Bn%7D", "{n}")
    try:
        study = study_view(view.session, study_uid, request.app.state.settings, request.app.state.thresholds, image_url)
    except BadUid as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    except NoStudy as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    body = _json(study)
    view.record(Action.STUDY, study_uid=study.study_instance_uid)
    return body


@api.get("/studies/{study_uid}/images/{n}", summary="The n-th rendered PNG, from 0", response_class=FileResponse,
         responses={200: {"content": {"image/png": {}}}})
def get_image(study_uid: StudyUid, n: int, view: Viewer) -> FileResponse:
    study = study_or_http_error(view.session, study_uid)
    try:
        path = image_path(view.session, study, n)
    except NoStudy as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    view.record(Action.IMAGE, study_uid=study.study_instance_uid, detail=f"image {n}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@api.post("/studies/{study_uid}/reprocess", status_code=status.HTTP_202_ACCEPTED, response_model=models.ReprocessOut,
          summary="Render and draft the study again; earlier reports are kept")
def reprocess_study(request: Request, study_uid: StudyUid, principal: Writer, session: Db) -> models.ReprocessOut:
    study = study_or_http_error(session, study_uid, lock=True)
    result = reprocess(session, study)
    record(session, principal, Action.REPROCESS, study_uid=study.study_instance_uid, client=_client(request),
           detail="queued" if result.queued else "already pending")
    return models.ReprocessOut(queued=result.queued, detail=result.detail)


@api.post("/studies/{study_uid}/feedback", status_code=status.HTTP_201_CREATED, response_model=models.FeedbackOut,
          summary="A reader's verdict and probe labels; the draft is never changed")
def post_feedback(request: Request, study_uid: StudyUid, body: models.FeedbackIn, principal: Writer, session: Db) -> models.FeedbackOut:
    study = study_or_http_error(session, study_uid)
    row = add_feedback(session, study, body, principal.name)
    record(session, principal, Action.FEEDBACK, study_uid=study.study_instance_uid, client=_client(request), detail=body.verdict)
    return models.FeedbackOut(id=row.id, report_id=row.report_id, token_name=row.token_name, verdict=body.verdict,
                              text=row.text, labels=body.labels, created_at=row.created_at)


@api.get("/quality", response_model=models.QualityOut, summary="Probe accuracy and verdicts from the readers' feedback")
def get_quality(request: Request, principal: Reader, session: Db) -> models.QualityOut:
    return quality(session, request.app.state.settings, request.app.state.thresholds)


@ops.get("/healthz", summary="The API process is up (no token needed)")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", response_model=models.Readiness, summary="Database, broker and pipeline processes",
         responses={503: {"model": models.Readiness}})
def readyz(request: Request, session: Db, principal: Annotated[Principal, Depends(scraper)]) -> JSONResponse:
    result = readiness(session, request.app.state.settings)
    code = status.HTTP_200_OK if result.ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(result.model_dump(mode="json"), status_code=code)


@ops.get("/metrics", summary="Prometheus metrics of the whole pipeline", response_class=Response)
def metrics(request: Request, principal: Annotated[Principal, Depends(scraper)]) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

"""One study for the reader: its identity, current draft, history, images; reprocess and feedback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, bindparam, exists, func, select
from sqlalchemy.orm import Session

from preread.api import models
from preread.api.urgency import from_rank, urgency_reason
from preread.ingest.assembly.catalog import is_valid_uid
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, Feedback, Finding, Image, Instance, Outbox, ProbeScore, Report, Series, Study, StudyState
from preread.worker.inference.thresholds import ProbeThreshold, threshold_for
from preread.worker.pipeline.queues import RENDER
from preread.worker.pipeline.stages import set_state

#: States in which the study is already on its way to a new draft.
IN_FLIGHT = (StudyState.RECEIVING, StudyState.STABLE, StudyState.RENDERED)


class BadUid(ValueError):
    """The path's study UID is not a DICOM UID (422)."""


class NoStudy(LookupError):
    """No study (or image) with that identity (404)."""


def find_study(session: Session, uid: str, *, lock: bool = False) -> Study:
    """The study with ``uid``; BadUid for a malformed UID, NoStudy for an unknown one."""
    if not is_valid_uid(uid):
        raise BadUid("not a DICOM UID: digits and dots, at most 64 characters, no leading zeros")
    query = select(Study).where(Study.study_instance_uid == uid)
    if lock:
        query = query.with_for_update()
    study = session.scalar(query)
    if study is None:
        raise NoStudy("no study with this Study Instance UID")
    return study


def _probe_fields(condition: str, score: float, thresholds: dict[str, ProbeThreshold], settings: Settings,
                  question: str | None = None) -> dict[str, Any]:
    """A probe score with its threshold and call, as the fields of :class:`models.ProbeScoreOut`."""
    threshold = threshold_for(thresholds, condition, settings).priority
    return {"condition": condition, "score": score, "threshold": threshold, "positive": score >= threshold,
            "question": question}


def viewer_link(settings: Settings, study: Study) -> str | None:
    """The site viewer's link for the study, from PREREAD_VIEWER_URL (only the study UID is substituted)."""
    if not settings.viewer_url:
        return None
    return settings.viewer_url.replace("{study_uid}", study.study_instance_uid)


def reprocess_pending(session: Session, study: Study) -> bool:
    """Whether a new draft is already on its way (a queued render, or a study still in the pipeline)."""
    if study.state in IN_FLIGHT:
        return True
    queued = session.scalar(
        select(Outbox.id).where(Outbox.study_id == study.id, Outbox.topic == RENDER, Outbox.sent_at.is_(None)).limit(1)
    )
    return queued is not None


def _queued_render() -> ColumnElement[bool]:
    """Whether the study (in the enclosing query) has a render waiting in the outbox."""
    return exists(select(Outbox.id).where(Outbox.study_id == Study.id, Outbox.topic == RENDER, Outbox.sent_at.is_(None)))


class _View:
    """The study page's statements, built once with bound parameters (building one costs more than running it)."""

    study_id = bindparam("study_id", type_=Integer)
    current = select(Report.id).where(Report.study_id == study_id, Report.current).scalar_subquery()
    study = select(
        Study,
        select(func.count(Series.id)).where(Series.study_id == Study.id).scalar_subquery(),
        select(func.count(Instance.id)).join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == Study.id).scalar_subquery(),
        _queued_render(),
    ).where(Study.study_instance_uid == bindparam("uid"))
    reports = (select(Report.id, Report.current, Report.created_at, Report.parse_status, Report.urgency, Report.impression,
                      Report.model_id, Report.prompt_version, Report.draft_text, Report.structured, Report.model_revision)
               .where(Report.study_id == study_id).order_by(Report.id.desc()))
    findings = (select(Finding.text, Finding.anatomy, Finding.laterality, Finding.presence, Finding.severity)
                .where(Finding.report_id == current).order_by(Finding.ordinal, Finding.id))
    probes = (select(ProbeScore.condition, ProbeScore.score, ProbeScore.question)
              .where(ProbeScore.study_id == study_id, ProbeScore.current).order_by(ProbeScore.score.desc()))
    images = select(Image.width, Image.height, Image.window).where(Image.study_id == study_id).order_by(Image.ordinal, Image.id)
    deliveries = (select(Delivery.destination, Delivery.kind, Delivery.state, Delivery.attempts, Delivery.last_error,
                         Delivery.sent_at, Delivery.updated_at)
                  .where(Delivery.report_id == current).order_by(Delivery.destination))
    feedback = (select(Feedback.id, Feedback.report_id, Feedback.token_name, Feedback.verdict, Feedback.text,
                       Feedback.labels, Feedback.created_at)
                .where(Feedback.study_id == study_id).order_by(Feedback.id.desc()))


def study_view(session: Session, uid: str, settings: Settings, thresholds: dict[str, ProbeThreshold],
               image_url: str) -> models.StudyOut:
    """Everything the study page shows, in seven statements that do not wait on each other's answers.

    BadUid for a malformed UID, NoStudy for an unknown one.
    """
    if not is_valid_uid(uid):
        raise BadUid("not a DICOM UID: digits and dots, at most 64 characters, no leading zeros")
    found = session.execute(_View.study, {"uid": uid}).first()
    if found is None:
        raise NoStudy("no study with this Study Instance UID")
    study, n_series, n_instances, queued = found
    connection, by_study = session.connection(), {"study_id": study.id}  # Core results for the rest: plain rows
    reports = connection.execute(_View.reports, by_study).all()
    current = next((r for r in reports if r.current), None)
    findings = connection.execute(_View.findings, by_study).all() if current is not None else []
    probes = [_probe_fields(c, s, thresholds, settings, q) for c, s, q in connection.execute(_View.probes, by_study)]
    images = connection.execute(_View.images, by_study).all()
    deliveries = connection.execute(_View.deliveries, by_study).all() if current is not None else []
    feedback = connection.execute(_View.feedback, by_study).all()
    top = (probes[0]["condition"], probes[0]["score"]) if probes else None
    report_out = None
    if current is not None:
        report_out = {
            "id": current.id, "created_at": current.created_at, "parse_status": current.parse_status,
            "draft_text": current.draft_text, "impression": current.impression, "urgency": current.urgency,
            "findings": [f._asdict() for f in findings], "structured": current.structured,
            "model_id": current.model_id, "model_revision": current.model_revision,
            "prompt_version": current.prompt_version,
        }
    return models.StudyOut.model_validate({
        "study_instance_uid": study.study_instance_uid,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "issuer_of_patient_id": study.issuer_of_patient_id,
        "patient_birth_date": study.patient_birth_date,
        "patient_age": study.patient_age,
        "patient_sex": study.patient_sex,
        "accession_number": study.accession_number,
        "study_description": study.study_description,
        "study_date": study.study_date,
        "modality": (study.modalities or "").split("\\")[0] or None,
        "body_part": study.body_part,
        "series_count": n_series,
        "instance_count": n_instances,
        "state": study.state,
        "error": study.error,
        "timings": {
            "first_received_at": study.first_received_at,
            "last_received_at": study.last_received_at,
            "state_changed_at": study.state_changed_at,
            "drafted_at": current.created_at if current else None,
        },
        "urgency": str(from_rank(study.priority)),
        "urgency_reason": urgency_reason(study.priority, study.urgency, current.urgency if current else None, top),
        "reprocess_pending": study.state in IN_FLIGHT or bool(queued),
        "viewer_url": viewer_link(settings, study),
        "report": report_out,
        "deliveries": [d._asdict() for d in deliveries],
        "probes": probes,
        "history": [
            {"id": r.id, "current": r.current, "created_at": r.created_at, "parse_status": r.parse_status,
             "urgency": r.urgency, "impression": r.impression, "model_id": r.model_id, "prompt_version": r.prompt_version}
            for r in reports
        ],
        "images": [{"n": n, "url": image_url.format(n=n), "width": w, "height": h, "window": win}
                   for n, (w, h, win) in enumerate(images)],
        "feedback": [{**f._asdict(), "labels": dict(f.labels or {})} for f in feedback],
    })


def image_path(session: Session, study: Study, n: int) -> Path:
    """The ``n``-th rendered PNG (from 0, in the order the model saw them); NoStudy if there is none."""
    if n < 0:
        raise NoStudy("image numbers start at 0")
    path = session.scalar(
        select(Image.path).where(Image.study_id == study.id).order_by(Image.ordinal, Image.id).offset(n).limit(1)
    )
    if path is None or not Path(path).is_file():
        raise NoStudy(f"the study has no rendered image {n}")
    return Path(path)


@dataclass(frozen=True, slots=True)
class ReprocessResult:
    """Whether a new render was queued, and why not."""

    queued: bool
    detail: str


def reprocess(session: Session, study: Study) -> ReprocessResult:
    """Queue the study for rendering and drafting again (outbox topic ``render``); earlier reports stay.

    The study row is locked (``find_study(lock=True)``), so two requests cannot both queue it.
    """
    if reprocess_pending(session, study):
        return ReprocessResult(False, f"a new draft is already on its way (study is {study.state})")
    set_state(session, study.id, StudyState.STABLE, handoff=RENDER, priority=study.priority)
    return ReprocessResult(True, "queued for rendering and drafting with the current settings, model and prompt")


def add_feedback(session: Session, study: Study, body: models.FeedbackIn, token_name: str) -> Feedback:
    """Store a reader's answer on the current draft, with the probe scores they saw; the draft is never changed."""
    report_id = session.scalar(select(Report.id).where(Report.study_id == study.id, Report.current))
    scores = {
        condition: score
        for condition, score in session.execute(
            select(ProbeScore.condition, ProbeScore.score).where(ProbeScore.study_id == study.id, ProbeScore.current)
        )
    }
    row = Feedback(study_id=study.id, report_id=report_id, token_name=token_name, verdict=body.verdict,
                   text=body.text, labels=body.labels, scores=scores)
    session.add(row)
    session.flush()
    return row


#: Search results come newest first.
SEARCH_ORDER = (Study.first_received_at.desc(),)


def search(body: models.SearchRequest, limit: int = 100) -> Select[int]:
    """The ids of studies with the given accession number or patient ID, newest first."""
    query = select(Study.id)
    if body.accession_number:
        query = query.where(Study.accession_number == body.accession_number)
    if body.patient_id:
        query = query.where(Study.patient_id == body.patient_id)
    return query.order_by(*SEARCH_ORDER).limit(limit)

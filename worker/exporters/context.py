"""What every exporter needs to know about one report, read once from the database.

An :class:`ExportContext` is plain data (no session), so builders are pure functions
of it and can run in any thread. Patient name and birth date are not in the database
for every study; builders that need them (SR, HL7) read the source instance header with
:func:`source_header`, and nothing here is ever logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from preread.schemas.settings import Settings
from preread.schemas.tables import Image, Instance, ProbeScore, Report, Series, Study
from preread.worker.inference.prompting import load_prompts


class ExportInputError(Exception):
    """The report cannot be exported as it is (no such report, no source instance on disk)."""


@dataclass(frozen=True, slots=True)
class Concept:
    """A coded concept: coding scheme designator (``SCT``, ``DCM``, ``99PREREAD``), code and meaning."""

    scheme: str
    code: str
    meaning: str


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """One triage probe of the report's run: probability and the cut it is judged at."""

    condition: str
    question: str
    score: float
    threshold: float
    concept: Concept

    @property
    def present(self) -> bool:
        """Present at the probe's threshold."""
        return self.score >= self.threshold


@dataclass(frozen=True, slots=True)
class FindingItem:
    """One free-text finding of the draft with its qualifiers."""

    text: str
    anatomy: str | None
    laterality: str | None
    presence: str | None
    severity: str | None


@dataclass(frozen=True, slots=True)
class SourceInstance:
    """A stored source instance the model saw (its frames were rendered and shown)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


@dataclass(frozen=True)
class ExportContext:
    """A report and its study, as exporters need them."""

    study_id: int
    report_id: int
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    modalities: str | None
    body_part: str | None
    study_description: str | None
    study_date: date | None
    urgency: str | None
    report_created_at: datetime
    impression: str | None
    draft_text: str | None
    raw_output: str
    parse_status: str
    structured: dict[str, object] | None
    model_id: str
    model_revision: str | None
    prompt_version: str
    #: Reports of the same study before this one, oldest first: (id, created_at).
    previous_reports: tuple[tuple[int, datetime], ...]
    #: This report's position among the study's reports, from 1.
    ordinal: int
    findings: tuple[FindingItem, ...] = ()
    probes: tuple[ProbeOutcome, ...] = ()
    seen: tuple[SourceInstance, ...] = field(default=())

    @property
    def modality(self) -> str | None:
        """The study's first modality other than SR."""
        for m in (self.modalities or "").replace(",", "\\").split("\\"):
            if m.strip() and m.strip().upper() not in {"SR", "PR", "KO"}:
                return m.strip().upper()
        return None


def probe_concepts(settings: Settings) -> dict[str, dict[str, object]]:
    """The ``[concepts]`` table of the prompt file: condition → scheme, code, meaning, optional threshold."""
    data = load_prompts(settings.prompts_path).data
    concepts = data.get("concepts", {})
    return dict(concepts) if isinstance(concepts, dict) else {}


def _probe_outcomes(session: Session, settings: Settings, study_id: int) -> tuple[ProbeOutcome, ...]:
    concepts = probe_concepts(settings)
    rows = session.execute(
        select(ProbeScore).where(ProbeScore.study_id == study_id, ProbeScore.current.is_(True)).order_by(ProbeScore.id)
    ).scalars()
    out = []
    for row in rows:
        coded = concepts.get(row.condition, {})
        concept = Concept(
            scheme=str(coded.get("scheme", "99PREREAD")),
            code=str(coded.get("code", row.condition.upper())),
            meaning=str(coded.get("meaning", row.condition.replace("_", " ").capitalize())),
        )
        threshold_value = coded.get("threshold", settings.priority_threshold)
        threshold = float(threshold_value) if isinstance(threshold_value, (int, float, str)) else settings.priority_threshold
        out.append(ProbeOutcome(row.condition, row.question, float(row.score), threshold, concept))
    return tuple(out)


def _seen_instances(session: Session, study_id: int) -> tuple[SourceInstance, ...]:
    """The instances whose frames the model was shown (the images table), else every instance of the study."""
    base = select(Instance.sop_class_uid, Instance.sop_instance_uid, Series.series_instance_uid, Instance.path).join(
        Series, Instance.series_id == Series.id
    )
    shown = session.execute(select(Image.sop_instance_uid).where(Image.study_id == study_id)).scalars().all()
    if shown:
        rows = session.execute(base.where(Instance.sop_instance_uid.in_(set(shown))).order_by(Instance.id)).all()
    else:
        rows = session.execute(base.where(Series.study_id == study_id).order_by(Instance.id)).all()
    return tuple(SourceInstance(r[0], r[1], r[2], Path(r[3])) for r in rows)


def load_context(session: Session, settings: Settings, report_id: int) -> ExportContext:
    """Everything exporters need about ``report_id``."""
    report = session.get(Report, report_id)
    if report is None:
        raise ExportInputError(f"report {report_id} does not exist")
    study = session.get(Study, report.study_id)
    assert study is not None  # foreign key
    earlier = session.execute(
        select(Report.id, Report.created_at).where(Report.study_id == study.id, Report.id < report.id).order_by(Report.id)
    ).all()
    findings = tuple(
        FindingItem(f.text, f.anatomy, f.laterality, f.presence, f.severity) for f in report.findings
    )
    return ExportContext(
        study_id=study.id,
        report_id=report.id,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        modalities=study.modalities,
        body_part=study.body_part,
        study_description=study.study_description,
        study_date=study.study_date,
        urgency=study.urgency,
        report_created_at=report.created_at,
        impression=report.impression,
        draft_text=report.draft_text,
        raw_output=report.raw_output,
        parse_status=report.parse_status,
        structured=report.structured,
        model_id=report.model_id,
        model_revision=report.model_revision,
        prompt_version=report.prompt_version,
        previous_reports=tuple((r[0], r[1]) for r in earlier),
        ordinal=len(earlier) + 1,
        findings=findings,
        probes=_probe_outcomes(session, settings, study.id),
        seen=_seen_instances(session, study.id),
    )


def source_header(ctx: ExportContext) -> Dataset:
    """The header (no pixels) of the first source instance the model saw, for the patient and study modules."""
    for source in ctx.seen:
        if source.path.is_file():
            return dcmread(source.path, stop_before_pixels=True)
    raise ExportInputError(f"study {ctx.study_id}: no source instance file on disk to copy the patient and study from")

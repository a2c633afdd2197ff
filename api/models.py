"""The API's request and response bodies (pydantic), as /docs shows them."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel as BaseModel, ConfigDict, Field, field_validator, model_validator

#: Probe (condition) names as the prompt file spells them.
PROBE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

Urgency = Literal["routine", "priority", "stat"]
Verdict = Literal["accept", "edit", "reject"]


class ProbeScoreOut(BaseModel):
    """A probe's current score, its threshold and whether it calls the condition present."""

    condition: str
    score: float
    threshold: float
    positive: bool
    question: str | None = None


class WorklistItem(BaseModel):
    """One row of the reading worklist."""

    study_instance_uid: str
    accession_number: str | None
    patient_name: str | None
    patient_id: str | None
    modality: str | None
    study_description: str | None
    state: str
    received_at: datetime
    urgency: Urgency
    report_urgency: Urgency | None
    urgency_reason: str | None = Field(None, description="Why the study's urgency differs from the draft's own.")
    top_probe: ProbeScoreOut | None
    probes: list[ProbeScoreOut]
    impression: str | None
    parse_status: str | None
    feedback: Verdict | None = Field(None, description="The latest verdict given on this study, if any.")


class WorklistPage(BaseModel):
    """A page of the worklist; pass ``next_cursor`` as ``cursor`` for the next one."""

    items: list[WorklistItem]
    next_cursor: str | None


class SearchRequest(BaseModel):
    """Find studies by accession number or patient ID; in the body, so no identifier reaches an access log."""

    model_config = ConfigDict(extra="forbid")

    accession_number: str | None = Field(None, max_length=16)
    patient_id: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _one_given(self) -> SearchRequest:
        if not (self.accession_number or self.patient_id):
            raise ValueError("give accession_number or patient_id")
        return self


class FindingOut(BaseModel):
    """One structured finding of a draft."""

    text: str
    anatomy: str | None
    laterality: str | None
    presence: str | None
    severity: str | None


class ReportOut(BaseModel):
    """A draft report and its provenance."""

    id: int
    created_at: datetime
    parse_status: str
    draft_text: str | None
    impression: str | None
    urgency: str | None
    findings: list[FindingOut]
    structured: dict | None
    model_id: str
    model_revision: str | None
    prompt_version: str


class ReportSummary(BaseModel):
    """An earlier (or the current) report in a study's history."""

    id: int
    current: bool
    created_at: datetime
    parse_status: str
    urgency: str | None
    impression: str | None
    model_id: str
    prompt_version: str


class ImageOut(BaseModel):
    """A rendered PNG, numbered from 0 in the order the model saw them."""

    n: int
    url: str
    width: int
    height: int
    window: str | None


class FeedbackOut(BaseModel):
    """A reader's answer on a draft."""

    id: int
    report_id: int | None
    token_name: str
    verdict: Verdict
    text: str | None
    labels: dict[str, bool]
    created_at: datetime


class StudyTimings(BaseModel):
    """When the study arrived, last changed state, and was last drafted."""

    first_received_at: datetime
    last_received_at: datetime
    state_changed_at: datetime
    drafted_at: datetime | None


class DeliveryOut(BaseModel):
    """One delivery of the current report to one destination, and where it stands."""

    destination: str
    kind: str
    state: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None
    updated_at: datetime


class StudyOut(BaseModel):
    """A study with its identity, state, current draft, history, images and feedback."""

    study_instance_uid: str
    patient_name: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_birth_date: date | None
    patient_age: str | None
    patient_sex: str | None
    accession_number: str | None
    study_description: str | None
    study_date: date | None
    modality: str | None
    body_part: str | None
    series_count: int
    instance_count: int
    state: str
    error: str | None
    timings: StudyTimings
    urgency: Urgency
    urgency_reason: str | None
    reprocess_pending: bool
    viewer_url: str | None
    report: ReportOut | None
    #: Each delivery of the current report (destination, state, attempts, last error).
    deliveries: list[DeliveryOut]
    probes: list[ProbeScoreOut]
    history: list[ReportSummary]
    images: list[ImageOut]
    feedback: list[FeedbackOut]


class ReprocessOut(BaseModel):
    """What a reprocess request did."""

    queued: bool
    detail: str


class FeedbackIn(BaseModel):
    """A reader's verdict on the current draft, with optional corrected text and probe labels."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    text: str | None = Field(None, max_length=20000)
    labels: dict[str, bool] = Field(default_factory=dict, description="{probe: true|false} as the reader judged the images.")

    @field_validator("labels")
    @classmethod
    def _probe_names(cls, value: dict[str, bool]) -> dict[str, bool]:
        bad = [k for k in value if not PROBE_NAME.match(k)]
        if bad or len(value) > 64:
            raise ValueError("label keys are probe names: lower-case letters, digits and _")
        return value


class ProbeQuality(BaseModel):
    """How one probe did against the readers' labels, at its threshold."""

    probe: str
    threshold: float
    labelled: int
    positives: int
    negatives: int
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int
    sensitivity: float | None
    specificity: float | None
    auroc: float | None


class VerdictQuality(BaseModel):
    """How often readers gave a verdict."""

    verdict: Verdict
    count: int
    rate: float


class VersionQuality(BaseModel):
    """Verdicts per model and prompt version."""

    model_id: str
    prompt_version: str
    answered: int
    accept: int
    edit: int
    reject: int
    accept_rate: float


class QualityOut(BaseModel):
    """The drafts' quality as the readers' latest answer per study shows it."""

    answered_studies: int
    probes: list[ProbeQuality]
    verdicts: list[VerdictQuality]
    versions: list[VersionQuality]


class Check(BaseModel):
    """One readiness check, and what failed."""

    name: str
    ok: bool
    detail: str


class Readiness(BaseModel):
    """Whether the pipeline can take work now."""

    ready: bool
    checks: list[Check]

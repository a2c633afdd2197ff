"""Database tables: the pipeline's state, shared by ingest, worker and api.

SQLAlchemy 2.0 typed models. Every schema change comes with an Alembic
migration under ``alembic/versions``; ``tests/test_migrations.py`` proves that
the migrations produce exactly these models on Postgres and on SQLite.
"""

from __future__ import annotations

import enum
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from preread.schemas.roles import ApiRole  # noqa: F401  (re-exported: the tables' enums in one place)

#: A DICOM UID is at most 64 characters.
UID = String(64)

#: JSONB on Postgres, JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp that compares correctly on SQLite too.

    Values are stored as naive UTC (SQLite has no time zones) and come back
    aware, so code never mixes naive and aware datetimes.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class StudyState(enum.StrEnum):
    """Where a study stands in the pipeline (DESIGN.md, study lifecycle)."""

    RECEIVING = "RECEIVING"
    STABLE = "STABLE"
    RENDERED = "RENDERED"
    DRAFTED = "DRAFTED"
    EXPORTED = "EXPORTED"
    FAILED = "FAILED"


class ParseStatus(enum.StrEnum):
    """Whether a report's raw model output parsed into the findings schema."""

    OK = "ok"
    INVALID = "invalid"
    EMPTY = "empty"


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with stable constraint names for migrations."""

    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    """A DICOM study (Study Instance UID) and its pipeline state."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    #: Stored for matching results back to the RIS; never logged or prompted.
    patient_id: Mapped[str | None] = mapped_column(String(64))
    #: Identity for the reading queue (shown to authenticated readers only); never logged or prompted.
    patient_name: Mapped[str | None] = mapped_column(String(200))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_birth_date: Mapped[date | None] = mapped_column(Date)
    patient_age: Mapped[str | None] = mapped_column(String(4))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[date | None] = mapped_column(Date)
    study_description: Mapped[str | None] = mapped_column(String(64))
    modalities: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), default="listener", server_default="listener")

    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, server_default="RECEIVING")
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    urgency: Mapped[str | None] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Highest current probe score (0 when none): the worklist's second sort key, kept beside the study for speed.
    top_probe_score: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)

    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    #: When an association that stored instances of the study was last released (a completion hint) ...
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: ... and ``released_at`` plus the modality's grace: STABLE then, unless an instance arrived after the release.
    release_hint_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When retention cleanup removed the study's stored instances and PNGs (rows are kept), and how many bytes.
    files_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    files_removed_bytes: Mapped[int | None] = mapped_column(BigInteger)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    reports: Mapped[list[Report]] = relationship(back_populates="study", cascade="all, delete-orphan")
    images: Mapped[list[Image]] = relationship(back_populates="study", cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_studies_state_changed", "state", "state_changed_at"),
        Index("ix_studies_last_received_at", "last_received_at"),
    )


#: The reading worklist's order as stored: urgency rank and highest probe score descending, then arrival.
Index("ix_studies_worklist", Study.priority.desc(), Study.top_probe_score.desc(), Study.first_received_at, Study.id)


class Series(Base):
    """A DICOM series (Series Instance UID) within a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    """A stored composite SOP instance: one file under the data dir."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Image(Base):
    """A rendered 8-bit PNG of one frame, as listed in the study's manifest."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id", ondelete="SET NULL"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    frame: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ordinal: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    path: Mapped[str] = mapped_column(String(1024))
    window: Mapped[str | None] = mapped_column(String(64))
    window_center: Mapped[float | None] = mapped_column(Float)
    window_width: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="images")


class Report(Base):
    """A draft report with its provenance; the newest per study is ``current``."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    current: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))

    draft_text: Mapped[str | None] = mapped_column(Text)
    impression: Mapped[str | None] = mapped_column(Text)
    urgency: Mapped[str | None] = mapped_column(String(16))
    raw_output: Mapped[str] = mapped_column(Text, default="")
    thinking: Mapped[str | None] = mapped_column(Text)
    parse_status: Mapped[str] = mapped_column(String(16))
    parse_error: Mapped[str | None] = mapped_column(Text)
    structured: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    model_id: Mapped[str] = mapped_column(String(256))
    model_revision: Mapped[str | None] = mapped_column(String(64))
    prompt_version: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16), default="json", server_default="json")
    min_pixels: Mapped[int | None] = mapped_column(Integer)
    max_pixels: Mapped[int | None] = mapped_column(Integer)
    n_images: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="reports")
    findings: Mapped[list[Finding]] = relationship(
        back_populates="report", cascade="all, delete-orphan", order_by="Finding.ordinal"
    )

    __table_args__ = (
        Index(
            "uq_reports_current_per_study",
            "study_id",
            unique=True,
            postgresql_where=text("current"),
            sqlite_where=text("current"),
        ),
    )


class Finding(Base):
    """One structured finding of a report."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    text: Mapped[str] = mapped_column(Text)
    anatomy: Mapped[str | None] = mapped_column(String(128))
    laterality: Mapped[str | None] = mapped_column(String(16))
    presence: Mapped[str | None] = mapped_column(String(16))
    severity: Mapped[str | None] = mapped_column(String(16))
    image_ref: Mapped[int | None] = mapped_column(Integer)

    report: Mapped[Report] = relationship(back_populates="findings")


class ProbeScore(Base):
    """P(yes) of one triage question for a study; the newest run is ``current``."""

    __tablename__ = "probe_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    condition: Mapped[str] = mapped_column(String(64))
    question: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)
    current: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    model_id: Mapped[str] = mapped_column(String(256))
    prompt_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        #: The worklist's probe filter: current scores of one condition, highest first.
        Index(
            "ix_probe_scores_current_condition",
            "condition",
            "score",
            "study_id",
            postgresql_where=text("current"),
            sqlite_where=text("current"),
        ),
        #: A study's current scores from the index alone: the worklist rows' probes and the probe filter's check.
        Index(
            "ix_probe_scores_current_study",
            "study_id",
            "condition",
            "score",
            postgresql_where=text("current"),
            sqlite_where=text("current"),
        ),
    )


class Outbox(Base):
    """A message to publish, written in the same transaction as the state change."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    topic: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (Index("ix_outbox_unsent", "sent_at", "id"),)


class DeliveryState(enum.StrEnum):
    """Where one report's delivery to one destination stands."""

    PENDING = "pending"  # waiting for its next attempt (``next_attempt_at``)
    SENDING = "sending"  # claimed by a sender until ``next_attempt_at`` (a lease)
    UNCONFIRMED = "unconfirmed"  # stored by the peer, Storage Commitment not yet confirmed
    DELIVERED = "delivered"  # done: acknowledged (and confirmed where asked)
    FAILED = "failed"  # gave up after ``delivery_max_age`` or a permanent refusal
    SUPERSEDED = "superseded"  # a newer report of the study replaced it before it went out


class Delivery(Base):
    """One report's delivery to one named destination, worked independently of every other.

    The coordinator sends what is due by ``next_attempt_at`` and backs off on failure, so a
    destination that is down holds up nothing else and loses nothing.
    """

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Storage Commitment: the transaction asked for, and when the peer confirmed it.
    commitment_uid: Mapped[str | None] = mapped_column(UID)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    __table_args__ = (
        Index("uq_deliveries_report_destination", "report_id", "destination", unique=True),
        Index("ix_deliveries_due", "state", "next_attempt_at"),
    )


class ProcessRole(enum.StrEnum):
    """The long-running processes of a deployment, as ``preread --help`` names their commands."""

    LISTENER = "listener"
    COORDINATOR = "coordinator"
    WORKER = "worker"
    API = "api"


class ProcessState(enum.StrEnum):
    """What a process says of itself in its heartbeat row."""

    STARTING = "starting"
    READY = "ready"
    NOT_READY = "not_ready"
    STOPPING = "stopping"


class Heartbeat(Base):
    """One row per running process: who it is, whether it is ready and why not, when it was last seen.

    ``preread status``, the live view and ``/readyz`` read this table to say in plain words
    which role (or which queue's worker) has not been seen. A process upserts its row every
    few seconds and marks it ``stopping`` on a clean exit; rows of processes not seen for a
    long time are pruned by the coordinator.
    """

    __tablename__ = "heartbeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: Comma-separated queues a worker consumes (``render,infer``); empty for other roles.
    queues: Mapped[str] = mapped_column(String(64), default="", server_default="")
    state: Mapped[str] = mapped_column(String(16), default=ProcessState.STARTING, server_default="starting")
    #: Why the process is not ready, in one line an operator can act on.
    reason: Mapped[str | None] = mapped_column(Text)
    #: Role-specific figures (device, model, batch occupancy, drafts per minute ...).
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        Index("uq_heartbeats_process", "role", "host", "pid", unique=True),
        Index("ix_heartbeats_last_seen", "last_seen"),
    )


class ApiToken(Base):
    """A named API token: only a hash of its secret is stored; revoked tokens stay for the audit trail."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: The public part of the token, used to find its row before the secret is compared.
    key: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """Who viewed or answered what, when, from where (no patient data beyond the study UID)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    token_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    client: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(255))


class Feedback(Base):
    """A reader's verdict on a draft, with probe labels; the draft itself is never changed."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id", ondelete="SET NULL"), index=True)
    token_name: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    #: {probe: true|false} as the reader judged the images.
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: The probe scores the reader saw, so quality figures survive a reprocess.
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
class SweepState(enum.StrEnum):
    """Where an archive sweep stands (``preread sweep``)."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


class SweepStudyState(enum.StrEnum):
    """Where one study of a sweep stands; the first three hold the study back from the stability monitor."""

    PENDING = "pending"
    COUNTED = "counted"
    RETRIEVING = "retrieving"
    RELEASED = "released"
    INCOMPLETE = "incomplete"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Sweep(Base):
    """An archive sweep: one source, a date range and filters, worked through by the coordinator."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    date_from: Mapped[date] = mapped_column(Date)
    date_to: Mapped[date] = mapped_column(Date)
    #: Comma-separated modalities (``CR,DX``); empty for all.
    modalities: Mapped[str] = mapped_column(String(64), default="", server_default="")
    force: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    ignore_window: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    state: Mapped[str] = mapped_column(String(16), default=SweepState.QUEUED, server_default="queued")
    #: The first day not yet queried (days before it have their study rows).
    next_day: Mapped[date | None] = mapped_column(Date)
    #: Studies per sweep-study state, refreshed by the runner (for ``sweep list`` and ``preread status``).
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    #: What the runner is doing now, in words (``waiting for the window 20:00-06:00``).
    note: Mapped[str | None] = mapped_column(Text)
    #: The coordinator process working on it, and until when its claim holds.
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: ``source@fire-time`` of a scheduled sweep: unique, so one deployment starts it once.
    schedule_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_sweeps_state", "state"),)


class SweepStudy(Base):
    """One study a sweep found: the instances counted at the source and received here, and its state."""

    __tablename__ = "sweep_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    study_date: Mapped[date | None] = mapped_column(Date)
    modalities: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=SweepStudyState.PENDING, server_default="pending")
    expected: Mapped[int | None] = mapped_column(Integer)
    received: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    __table_args__ = (
        Index("uq_sweep_studies_sweep_study", "sweep_id", "study_instance_uid", unique=True),
        Index("ix_sweep_studies_hold", "study_instance_uid", "state"),
    )
class CleanupRun(Base):
    """One retention cleanup: why it ran, what it removed and what it freed (``preread status`` shows the last)."""

    __tablename__ = "cleanup_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: ``age`` (the daily pass or ``preread cleanup``) or ``space`` (free space under twice the watermark).
    reason: Mapped[str] = mapped_column(String(16))
    studies: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    files: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    bytes_freed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    free_bytes_after: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

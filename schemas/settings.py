"""Runtime settings, read from ``PREREAD_*`` environment variables.

Every URL, secret and path comes from here, never from code. Defaults are the
embedded ones: a SQLite file and a server-less queue in the data dir, so that
``preread run`` works on a fresh machine with nothing else running.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: One visual token covers a 28x28 pixel patch (14 px patches merged 2x2).
PIXELS_PER_TOKEN = 28 * 28


class Settings(BaseSettings):
    """All configuration of infimed-preread."""

    model_config = SettingsConfigDict(env_prefix="PREREAD_", env_file=None, extra="ignore")

    # --- storage and persistence -------------------------------------------------
    data_dir: Path = Field(Path("./preread-data"), description="Root of stored instances, PNGs and quarantine.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default is a SQLite file in the data dir.")
    broker_url: str | None = Field(None, description="Celery broker URL; default is a server-less transport in the data dir.")

    # --- model --------------------------------------------------------------------
    model: str = Field("InfiX-ai/InfiMed-SFT-3B", description="Hub id or local folder of an InfiMed / Qwen2.5-VL model.")
    model_revision: str | None = Field(None, description="Hub revision (commit or tag) to pin.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    min_pixels: int = Field(256 * PIXELS_PER_TOKEN, description="Smallest image area given to the model.")
    max_pixels: int = Field(1280 * PIXELS_PER_TOKEN, description="Largest image area given to the model.")
    max_new_tokens: int = Field(1024, description="Upper bound on generated tokens for a draft.")
    max_images: int = Field(4, description="Most images from one study shown to the model.")
    draft_mode: str = Field("json", description="'json' (schema-constrained) or 'text' (Findings/Impression).")
    think: str = Field("auto", description="'auto' (on for InfiMed-RL ids), 'on' or 'off': a <think> block before the answer.")
    prompts_path: Path | None = Field(None, description="Prompt file or folder; default the packaged worker/prompts.")
    batch_size: int = Field(8, description="Most drafts in one batched generate.")
    probe_batch_rows: int = Field(32, description="Most probe questions in one batched forward pass.")
    batch_wait_ms: float = Field(5.0, description="Longest a request waits for its batch to fill.")

    # --- ingest (DICOM listener) -----------------------------------------------------
    ae_title: str = Field("PREREAD", description="Our Application Entity title.")
    host: str = Field("0.0.0.0", description="Address the listener binds.")
    port: int = Field(11112, description="DICOM port the listener binds.")
    allowed_aes: str | None = Field(
        None, description="Comma-separated calling AE titles, each optionally 'AE@address'; empty allows all."
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    stable_after: float = Field(30.0, description="Seconds without a new instance before a study is STABLE.")
    min_free_bytes: int = Field(512 * 1024 * 1024, description="Refuse C-STORE (0xA700) below this free space.")
    sync_writes: bool = Field(
        True,
        description="True: an acknowledged instance survives power loss and OS crashes (file and folder fsynced, "
        "SQLite synchronous=FULL, Postgres synchronous_commit as configured). False: it survives the listener "
        "process being killed, not an OS crash or power loss (no fsync; SQLite synchronous=NORMAL in WAL mode and "
        "Postgres synchronous_commit=off on the listener's connections); faster ingest.",
    )

    # --- queue ------------------------------------------------------------------------
    visibility_timeout: int = Field(3600, description="Seconds before Redis redelivers an unacknowledged task.")
    reconcile_after: float = Field(300.0, description="Seconds a study may sit in STABLE/RENDERED/DRAFTED before it is re-enqueued.")
    max_attempts: int = Field(5, description="Attempts per study before it is FAILED for good.")
    dispatch_interval: float = Field(0.5, description="Seconds between outbox, stability and reconciler passes.")

    # --- export -------------------------------------------------------------------------
    export_fhir: bool = Field(False, description="Write a FHIR DiagnosticReport (preliminary) per drafted study.")
    webhook_url: str | None = Field(None, description="POST signed JSON here when a draft is ready.")
    webhook_secret: str | None = Field(None, description="HMAC-SHA256 key for the webhook signature header.")
    # (results-out issue) destinations and how results are written; the settings file holds `[[destinations]]`.
    destinations: list[dict[str, Any]] = Field(
        default_factory=list, description="Named result destinations ([[destinations]] tables: name, kind, fields of the kind)."
    )
    sr_template: Literal["comprehensive-3d", "basic-text"] = Field(
        "comprehensive-3d", description="DICOM SR written: a TID 1500 Comprehensive 3D SR, or a Basic Text SR for simple viewers."
    )
    fhir_version: Literal["R4", "R4B", "R5"] = Field("R4", description="FHIR release of the Bundle posted to FHIR servers.")
    patient_id_system: str | None = Field(
        None, description="FHIR identifier system of the Patient ID (the RIS's MRN namespace, e.g. urn:oid:...)."
    )
    delivery_max_age: float = Field(86400.0, description="Seconds a delivery is retried (with backoff) before it is failed.")
    delivery_backoff_max: float = Field(900.0, description="Longest wait between two attempts of one delivery, in seconds.")

    # --- triage ----------------------------------------------------------------------
    priority_threshold: float = Field(0.5, description="Probe score from which a study is 'priority'.")
    stat_threshold: float = Field(0.85, description="Probe score from which a study is 'stat'.")

    @field_validator("ae_title")
    @classmethod
    def _ae_title_valid(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16:
            raise ValueError("AE title must be 1 to 16 characters")
        return value

    @property
    def effective_database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'preread.db').resolve()}"

    @property
    def export_enabled(self) -> bool:
        """Whether drafted studies go on to the export queue."""
        return self.export_fhir or bool(self.webhook_url) or bool(self.destinations)

    @property
    def exports_dir(self) -> Path:
        """Where FHIR DiagnosticReports are written."""
        return self.data_dir / "exports"

    @property
    def storage_dir(self) -> Path:
        """Where received instances live, one file per SOP instance."""
        return self.data_dir / "studies"

    @property
    def images_dir(self) -> Path:
        """Where rendered PNGs and their manifests live."""
        return self.data_dir / "images"

    @property
    def quarantine_dir(self) -> Path:
        """Where refused datasets are kept with a reason file."""
        return self.data_dir / "quarantine"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()

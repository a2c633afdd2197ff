"""Runtime settings: ``PREREAD_*`` environment variables over one optional TOML file.

Every URL, secret and path comes from here, never from code. Defaults are the
embedded ones: a SQLite file and a server-less queue in the data dir, so that
``preread run`` works on a fresh machine with nothing else running.

``PREREAD_CONFIG_FILE`` names a TOML file that may hold any setting under its
name without the prefix (``stable_after = 30``), and the lists of tables that
have no sensible environment-variable form (``[[destinations]]``,
``[[sources]]``). An environment variable overrides the file; a key the file
should not hold is an error that names it.
"""

from __future__ import annotations

import os
import re
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

#: One visual token covers a 28x28 pixel patch (14 px patches merged 2x2).
PIXELS_PER_TOKEN = 28 * 28

#: Every setting's environment variable starts with this.
ENV_PREFIX = "PREREAD_"

#: The environment variable naming the settings file.
CONFIG_FILE_ENV = "PREREAD_CONFIG_FILE"

_TRUE_WORDS = frozenset({"on", "true", "yes", "1"})
_FALSE_WORDS = frozenset({"off", "false", "no", "0"})
#: Grace after a released association, by modality: single-frame projections are complete when the
#: association ends; CT and MR senders often use one association per series.
DEFAULT_RELEASE_GRACE: dict[str, float] = {
    "CR": 1.0, "DX": 1.0, "MG": 1.0, "RG": 1.0, "XA": 1.0, "RF": 1.0, "IO": 1.0, "PX": 1.0,
    "CT": 10.0, "MR": 10.0,
    "default": 5.0,
}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class SettingsError(ValueError):
    """A setting has a value it cannot have; the message names each ``PREREAD_*`` variable and what it must be."""


class SettingsFileError(SettingsError):
    """The settings file is missing, is not TOML, or holds a key that is not a setting."""


class TlsFiles(BaseModel):
    """The shared ``tls`` table shape: our certificate and key, and the CA that verifies peers."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    cert: Path | None = Field(None, description="PEM certificate chain presented to peers.")
    key: Path | None = Field(None, description="PEM private key of ``cert``.")
    ca: Path | None = Field(None, description="PEM CA bundle; when set, peers must present a certificate it signed.")


class Endpoint(BaseModel):
    """One entry of a ``[[destinations]]`` or ``[[sources]]`` array: a named peer of some kind.

    Each kind adds its own keys (kept as extra fields until that kind's model exists).
    """

    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    name: str = Field(min_length=1, description="Unique name, used in logs, status and the database.")
    kind: str = Field(min_length=1, description="What the peer is, e.g. 'dicom', 'dicomweb', 'fhir', 'webhook'.")
    tls: TlsFiles | None = Field(
        None,
        description="TLS files for this peer, when it needs TLS.",
        exclude_if=lambda value: value is None,  # a dump holds the keys the table had, for the kind's own model
    )


class Destination(Endpoint):
    """Where results go: one ``[[destinations]]`` table."""


class Source(Endpoint):
    """Where studies come from: one ``[[sources]]`` table."""


class SettingsFile(TomlConfigSettingsSource):
    """The TOML file named by ``PREREAD_CONFIG_FILE``: present, valid TOML, and only known keys."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        if not path.is_file():
            raise SettingsFileError(f"{CONFIG_FILE_ENV}={path}: no such file; fix the path or unset {CONFIG_FILE_ENV}")
        try:
            super().__init__(settings_cls, toml_file=path)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsFileError(f"{CONFIG_FILE_ENV}={path}: not valid TOML: {exc}") from None
        known = set(settings_cls.model_fields)
        for key in self.toml_data:
            if key.lower() not in known:
                raise SettingsFileError(f"{CONFIG_FILE_ENV}={path}: unknown setting {key!r}{_suggest(key, known)}")


def _suggest(key: str, known: set[str]) -> str:
    """A did-you-mean hint for a misspelt or prefixed setting name."""
    import difflib  # only on this error path
    name = key.lower().removeprefix(ENV_PREFIX.lower())
    if name in known:
        return f" (write it without the prefix: {name!r})"
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _split_commas(value: Any) -> Any:
    """An environment variable holds a list as ``"a, b,c"``; TOML holds a real array."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """All configuration of infimed-preread."""

    # defer_build: the validators are built on first use, not when a command that never reads settings starts
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, extra="forbid", validate_default=True, defer_build=True
    )

    # --- storage and persistence -------------------------------------------------
    data_dir: Path = Field(Path("./preread-data"), description="Root of stored instances, PNGs and quarantine.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default is a SQLite file in the data dir.")
    broker_url: str | None = Field(None, description="Celery broker URL; default is a server-less transport in the data dir.")

    # --- model --------------------------------------------------------------------
    model: str = Field("InfiX-ai/InfiMed-SFT-3B", description="Hub id or local folder of an InfiMed / Qwen2.5-VL model.")
    model_revision: str | None = Field(None, description="Hub revision (commit or tag) to pin.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    min_pixels: int = Field(256 * PIXELS_PER_TOKEN, gt=0, description="Smallest image area given to the model.")
    max_pixels: int = Field(1280 * PIXELS_PER_TOKEN, gt=0, description="Largest image area given to the model.")
    max_new_tokens: int = Field(1024, gt=0, description="Upper bound on generated tokens for a draft.")
    max_images: int = Field(4, gt=0, description="Most images from one study shown to the model.")
    draft_mode: Literal["json", "text"] = Field("json", description="'json' (schema-constrained) or 'text' (Findings/Impression).")
    think: bool | Literal["auto"] = Field(
        "auto", description="'auto' (on for InfiMed-RL ids), or on/off (true/false): a <think> block before the answer."
    )
    prompts_path: Path | None = Field(None, description="Prompt file or folder; default the packaged worker/prompts.")
    batch_size: int = Field(8, gt=0, description="Most drafts in one batched generate.")
    probe_batch_rows: int = Field(32, gt=0, description="Most probe questions in one batched forward pass.")
    batch_wait_ms: float = Field(5.0, ge=0, description="Longest a request waits for its batch to fill.")

    # --- ingest (DICOM listener) -----------------------------------------------------
    ae_title: str = Field("PREREAD", description="Our Application Entity title.")
    host: str = Field("0.0.0.0", description="Address the listener binds.")
    port: int = Field(11112, ge=0, le=65535, description="DICOM port the listener binds.")
    allowed_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles, each optionally 'AE@address' or 'AE@network' (comma-separated in the "
        "environment, an array in the settings file); empty allows all.",
    )
    called_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Called AE titles accepted, comma-separated; empty accepts ae_title only, '*' accepts any.",
    )
    association_request_timeout: float = Field(
        5.0, gt=0, description="Seconds from accepting a connection (TLS handshake included) to its A-ASSOCIATE-RQ.",
    )
    max_connections_per_address: int = Field(
        32, ge=1, description="Connections one peer address may hold at once (modalities behind one NAT share it).",
    )
    tls_cert: Path | None = Field(None, description="The listener's PEM certificate chain; TLS on when set.")
    tls_key: Path | None = Field(None, description="The listener's PEM private key.")
    tls_ca: Path | None = Field(None, description="PEM CA bundle; when set, callers must present a certificate it signed.")
    stable_after: float = Field(30.0, ge=0, description="Seconds without a new instance before a study is STABLE.")
    min_free_bytes: int = Field(512 * 1024 * 1024, ge=0, description="Refuse C-STORE (0xA700) below this free space.")
    sync_writes: bool = Field(
        True,
        description="True: an acknowledged instance survives power loss and OS crashes (file and folder fsynced, "
        "SQLite synchronous=FULL, Postgres synchronous_commit as configured). False: it survives the listener "
        "process being killed, not an OS crash or power loss (no fsync; SQLite synchronous=NORMAL in WAL mode and "
        "Postgres synchronous_commit=off on the listener's connections); faster ingest.",
    )

    release_grace: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_RELEASE_GRACE),
        description="Seconds after a released association before the studies it stored are STABLE, by modality "
        "(a settings-file table, e.g. {CR = 1, CT = 10, default = 5}); more instances in that time cancel it.",
    )
    retention_days: int | None = Field(
        None, gt=0, description="Days stored instances, PNGs and quarantine are kept; unset: nothing is ever deleted."
    )

    # --- queue ------------------------------------------------------------------------
    longest_task: float = Field(900.0, gt=0, description="Seconds the longest task may take (an infer of a large study on CPU).")
    visibility_timeout: int | None = Field(
        None, gt=0, description="Seconds before Redis redelivers an unacknowledged task; default twice longest_task."
    )
    reconcile_after: float = Field(
        300.0,
        gt=0,
        description="Seconds a study may wait in STABLE or RENDERED with no hand-off in flight before the "
        "reconciler re-enqueues it (DRAFTED studies are the coordinator's deliveries' to retry).",
    )
    readiness_recheck: float = Field(60.0, gt=0, description="Seconds between model-load checks of a not-ready infer worker.")
    max_attempts: int = Field(5, gt=0, description="Attempts per study before it is FAILED for good.")
    dispatch_interval: float = Field(0.5, gt=0, description="Seconds between outbox, stability and reconciler passes.")

    # --- export -------------------------------------------------------------------------
    export_fhir: bool = Field(False, description="Write a FHIR DiagnosticReport (preliminary) per drafted study.")
    webhook_url: str | None = Field(None, description="POST signed JSON here when a draft is ready.")
    webhook_secret: str | None = Field(None, description="HMAC-SHA256 key for the webhook signature header.")
    # (results-out issue) destinations and how results are written; the settings file holds `[[destinations]]`.
    sr_template: Literal["comprehensive-3d", "basic-text"] = Field(
        "comprehensive-3d", description="DICOM SR written: a TID 1500 Comprehensive 3D SR, or a Basic Text SR for simple viewers."
    )
    fhir_version: Literal["R4", "R4B", "R5"] = Field("R4", description="FHIR release of the Bundle posted to FHIR servers.")
    patient_id_system: str | None = Field(
        None, description="FHIR identifier system of the Patient ID (the RIS's MRN namespace, e.g. urn:oid:...)."
    )
    delivery_max_age: float = Field(86400.0, gt=0, description="Seconds a delivery is retried (with backoff) before it is failed.")
    delivery_backoff_max: float = Field(900.0, gt=0, description="Longest wait between two attempts of one delivery, in seconds.")

    # --- GPU hosts that share only the queue and the database with the listener -------------
    images_url: str | None = Field(
        None,
        description="Base URL of the listener host's `preread api` (e.g. 'https://listener:8080'): an infer worker "
        "fetches each study's rendered PNGs from it (with PREREAD_WORKER_TOKEN) into its own data dir instead of "
        "reading the listener's data dir; unset: PNGs are read from the data dir (one host, or a shared mount).",
    )
    worker_token: SecretStr | None = Field(
        None,
        description="A `worker`-role API token (`preread token create NAME --role worker` on the API host), "
        "needed with images_url; never printed.",
    )
    images_ca: Path | None = Field(
        None, description="PEM CA bundle that verifies images_url's HTTPS certificate (a site CA); default the system's."
    )

    # --- peers (settings file arrays) ----------------------------------------------------
    destinations: list[Destination] = Field(default_factory=list, description="[[destinations]]: where results go.")
    sources: list[Source] = Field(default_factory=list, description="[[sources]]: where studies come from.")

    # --- triage ----------------------------------------------------------------------
    priority_threshold: float = Field(0.5, ge=0, le=1, description="Probe score from which a study is 'priority'.")
    stat_threshold: float = Field(0.85, ge=0, le=1, description="Probe score from which a study is 'stat'.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then ``PREREAD_*`` variables, then the settings file, then defaults."""
        path = os.environ.get(CONFIG_FILE_ENV, "").strip()
        if not path:
            return (init_settings, env_settings)
        return (init_settings, env_settings, SettingsFile(settings_cls, Path(path).expanduser()))

    # --- reading queue (HTTP API and dashboard) -------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the API binds (loopback unless configured otherwise).")
    api_port: int = Field(8080, description="TCP port of the API and dashboard.")
    api_open_to: str | None = Field(
        None, description="Comma-separated addresses or networks that may read /metrics and /readyz without a token."
    )
    api_max_body: int = Field(64 * 1024, description="Largest request body the API accepts, in bytes.")
    api_tls_cert: Path | None = Field(None, description="PEM certificate: the API serves HTTPS when set (with api_tls_key).")
    api_tls_key: Path | None = Field(None, description="PEM private key of api_tls_cert.")
    api_cors_origins: str | None = Field(None, description="Comma-separated origins allowed by CORS; default none (off).")
    viewer_url: str | None = Field(
        None, description="The site viewer's study link, e.g. 'https://pacs/viewer?study={study_uid}'."
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title_valid(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16:
            raise ValueError(f"{ENV_PREFIX}AE_TITLE must be 1 to 16 characters, not {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device_valid(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"{ENV_PREFIX}DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {value!r}")
        return value

    @field_validator("images_url")
    @classmethod
    def _images_url_valid(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from urllib.parse import urlsplit  # only when there is a URL to read

        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise ValueError(f"{ENV_PREFIX}IMAGES_URL holds no credentials: put the worker token in {ENV_PREFIX}WORKER_TOKEN")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(
                f"{ENV_PREFIX}IMAGES_URL must be the API's base URL, e.g. https://listener-host:8080, not {value!r}"
            )
        return url

    @field_validator("worker_token")
    @classmethod
    def _worker_token_with_url(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            value = None
        if value is None and info.data.get("images_url"):
            raise ValueError(
                "needed with PREREAD_IMAGES_URL: create one on the API host with "
                "`preread token create NAME --role worker` and set it here"
            )
        return value

    @field_validator("release_grace")
    @classmethod
    def _release_grace_valid(cls, value: dict[str, float]) -> dict[str, float]:
        given = {key.strip().upper() if key.strip().lower() != "default" else "default": float(v) for key, v in value.items()}
        table = {**DEFAULT_RELEASE_GRACE, **given}  # a file that names CT only keeps the other defaults
        negative = sorted(key for key, v in table.items() if v < 0)
        if negative:
            raise ValueError(f"{ENV_PREFIX}RELEASE_GRACE: seconds must be >= 0 (see {', '.join(negative)})")
        return table

    def grace_for(self, modalities: str | None) -> float:
        """Release grace for a study's modalities (``CT\\PR``): the longest of theirs (``default`` for one not listed)."""
        names = [m.strip().upper() for m in (modalities or "").split("\\") if m.strip()]
        default = self.release_grace["default"]
        return max((self.release_grace.get(m, default) for m in names), default=default)

    @field_validator("think", mode="before")
    @classmethod
    def _think_word(cls, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip().lower()
            if word == "auto":
                return "auto"
            if word in _TRUE_WORDS | _FALSE_WORDS:
                return word in _TRUE_WORDS
            raise ValueError(f"{ENV_PREFIX}THINK must be 'auto', 'on' or 'off', not {value!r}")
        return value

    @field_validator("allowed_aes", mode="before")
    @classmethod
    def _allowed_aes_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("allowed_aes")
    @classmethod
    def _allowed_aes_valid(cls, value: list[str]) -> list[str]:
        import ipaddress  # only when there is an allowlist to read
        entries = []
        for item in value:
            title, at, address = (part.strip() for part in item.partition("@"))
            if not title or len(title) > 16:
                raise ValueError(f"{ENV_PREFIX}ALLOWED_AES: AE title must be 1 to 16 characters, not {title!r}")
            if at:
                try:
                    ipaddress.ip_network(address, strict=False)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}ALLOWED_AES: {address!r} (for {title}) is not an address or network") from None
            entries.append(f"{title}@{address}" if at else title)
        return entries

    @field_validator("destinations", "sources")
    @classmethod
    def _names_unique(cls, value: list[Endpoint]) -> list[Endpoint]:
        names = [entry.name for entry in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"names must be unique; repeated: {', '.join(duplicates)}")
        return value

    @field_validator("called_aes", mode="before")
    @classmethod
    def _split_called_aes(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("called_aes")
    @classmethod
    def _called_aes_valid(cls, value: list[str]) -> list[str]:
        for title in value:
            if title != "*" and len(title) > 16:
                raise ValueError(f"called AE title {title!r} is longer than 16 characters")
        return value

    @property
    def effective_database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'preread.db').resolve()}"

    @property
    def listener_tls(self) -> TlsFiles:
        """The listener's TLS files in the shared ``tls`` shape."""
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)

    @property
    def effective_visibility_timeout(self) -> int:
        """Seconds before Redis redelivers a task: set, or twice the longest expected task."""
        return self.visibility_timeout or int(2 * self.longest_task)

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


def describe_error(exc: ValidationError | SettingsFileError) -> str:
    """One line per problem, naming the ``PREREAD_*`` variable (or settings-file key) and what it must be."""
    if isinstance(exc, SettingsFileError):
        return str(exc)
    lines = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc", ())
        field = str(loc[0]) if loc else "?"
        where = f"{ENV_PREFIX}{field.upper()}" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
        message = str(error.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        lines.append(message if message.startswith(ENV_PREFIX) else f"{where}: {message}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment and the settings file.

    Raises :class:`SettingsError` (one line per bad setting, naming it) for an operator to read.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_error(exc)) from None

"""Sweep sources: the PACS, DICOMweb servers and folders named in the settings file's ``[[sources]]``.

The settings (``schemas/settings.py``) carry the list as ``sources`` once the
settings file is wired; until then, and for tests, :func:`load_sources` reads
the TOML file named by ``PREREAD_CONFIG_FILE`` itself.
"""

from __future__ import annotations

import enum
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Retrieve(enum.StrEnum):
    """How a DICOM source's studies come here."""

    C_MOVE = "c-move"
    C_GET = "c-get"


class TLSConfig(BaseModel):
    """TLS towards a source: CA to trust, and our certificate and key for mutual TLS."""

    model_config = ConfigDict(extra="forbid")

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    max_associations: int = Field(2, ge=1, description="Associations (or HTTP connections) open to it at once.")
    max_results: int | None = Field(None, ge=1, description="The source's query result limit, if it has one.")
    max_in_flight: int = Field(4, ge=1, description="Sweep studies retrieved but not yet drafted, at once.")


class DicomSource(_Source):
    """A PACS spoken to with C-FIND and C-MOVE (to this listener's AE title) or C-GET."""

    kind: Literal["dicom"]
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    retrieve: Retrieve = Retrieve.C_MOVE
    #: Destination AE title of a C-MOVE; default this listener's (``PREREAD_AE_TITLE``).
    move_destination: str | None = Field(None, max_length=16)
    #: Our calling AE title; default this listener's.
    calling_ae_title: str | None = Field(None, max_length=16)
    #: Studies asked for in one C-MOVE or C-GET: a list of Study Instance UIDs in the identifier's unique key,
    #: as the standard's retrieve allows; each study is still counted and checked on its own. A PACS that refuses
    #: a list is detected and asked one study per request; 1 skips the list altogether.
    move_batch: int = Field(10, ge=1, le=100, description="Studies asked for in one C-MOVE or C-GET request.")
    tls: TLSConfig | None = None


class DicomWebSource(_Source):
    """A DICOMweb server: QIDO-RS to find, WADO-RS to retrieve."""

    kind: Literal["dicomweb"]
    url: str
    token: str | None = Field(None, description="Bearer token sent with every request.")
    tls: TLSConfig | None = None

    @field_validator("url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.rstrip("/")


class FolderSource(_Source):
    """A directory tree of DICOM files."""

    kind: Literal["folder"]
    path: Path


Source = Annotated[DicomSource | DicomWebSource | FolderSource, Field(discriminator="kind")]
_SOURCES = TypeAdapter(list[Source])


class SweepEnv(BaseSettings):
    """The sweep's own ``PREREAD_*`` settings, read until the central settings carry them."""

    model_config = SettingsConfigDict(env_prefix="PREREAD_", env_file=None, extra="ignore")

    config_file: Path | None = Field(None, description="TOML settings file with the [[sources]] array.")
    sweep_window: str | None = Field(None, description="Off-peak window, local time, e.g. '20:00-06:00'.")
    sweep_schedule: str | None = Field(None, description="Cron expression starting a sweep of the previous day.")


class SourceError(ValueError):
    """The sources configuration is wrong; the message names the setting to fix."""


def _brief(exc: ValidationError, raw: list[Any]) -> str:
    """A pydantic error as one line: which source, which field, what is wrong."""
    parts = []
    for err in exc.errors()[:4]:
        loc = list(err["loc"])
        first = loc[0] if loc else None
        index = first if isinstance(first, int) else None
        if index is not None:
            loc.pop(0)
        if loc and loc[0] in ("dicom", "dicomweb", "folder"):
            loc.pop(0)
        name = raw[index].get("name") if index is not None and isinstance(raw[index], dict) else None
        where = f"source {name!r}" if name else f"source #{(index or 0) + 1}"
        field = ".".join(str(p) for p in loc) or "kind"
        parts.append(f"{where}: {field}: {err['msg']}")
    return "; ".join(parts)


def parse_sources(raw: list[dict[str, Any]] | list[Any]) -> list[DicomSource | DicomWebSource | FolderSource]:
    """Validate a ``[[sources]]`` list; duplicate names are an error."""
    try:
        sources = _SOURCES.validate_python(raw)
    except ValidationError as exc:
        raise SourceError(f"[[sources]] in the settings file (PREREAD_CONFIG_FILE): {_brief(exc, raw)}") from None
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SourceError(f"[[sources]]: the name {duplicates[0]!r} is used twice; give each source its own name")
    return sources


def load_sources(settings: Any = None, config_file: Path | None = None) -> list[DicomSource | DicomWebSource | FolderSource]:
    """The configured sources: ``settings.sources`` when the settings have it, else the TOML file's ``[[sources]]``."""
    configured = getattr(settings, "sources", None) if settings is not None else None
    if configured is not None:
        return parse_sources([s.model_dump() if isinstance(s, BaseModel) else s for s in configured])
    path = config_file or SweepEnv().config_file
    if path is None:
        return []
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise SourceError(f"PREREAD_CONFIG_FILE={path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SourceError(f"PREREAD_CONFIG_FILE={path}: not valid TOML ({exc})") from None
    return parse_sources(data.get("sources", []))


def find_source(sources: list[DicomSource | DicomWebSource | FolderSource], name: str) -> DicomSource | DicomWebSource | FolderSource:
    """The source called ``name``; the error lists the configured names."""
    for source in sources:
        if source.name == name:
            return source
    known = ", ".join(s.name for s in sources) or "none"
    raise SourceError(f"no source named {name!r} in [[sources]] of the settings file (PREREAD_CONFIG_FILE); configured: {known}")

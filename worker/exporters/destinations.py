"""Where results go: named destinations, one pydantic model per kind.

The settings file holds them as ``[[destinations]]`` tables (``name``, ``kind`` and the
fields of the kind); ``PREREAD_EXPORT_FHIR`` and ``PREREAD_WEBHOOK_URL`` stay as shorthands
for one implicit destination each. Optional ``modalities`` and ``min_urgency`` choose
the studies a destination receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from preread.schemas.findings import Urgency
from preread.schemas.settings import Settings

#: What a destination can be sent: a DICOM SR, a FHIR Bundle, the webhook JSON, an HL7 v2 ORU.
Sendable = Literal["sr", "fhir", "webhook", "hl7"]

#: Names of the implicit destinations the shorthand settings make.
IMPLICIT_FHIR_FILE = "fhir-file"
IMPLICIT_WEBHOOK = "webhook"


class DestinationError(ValueError):
    """The destinations in the settings are wrong; the message names the destination and field."""


class TlsConfig(BaseModel):
    """The shared ``tls`` table shape: our certificate and key, the peer's CA."""

    model_config = ConfigDict(extra="forbid")

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


class _Destination(BaseModel):
    """Fields every destination has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    modalities: tuple[str, ...] = ()
    min_urgency: Urgency | None = None

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.strip().upper() for m in value if m.strip())

    def wants(self, modalities: str | None, urgency: str | None) -> bool:
        """Whether a study with these modalities (``CT\\SR``) and urgency goes to this destination."""
        if self.modalities:
            have = {m.strip().upper() for m in (modalities or "").replace(",", "\\").split("\\") if m.strip()}
            if not have & set(self.modalities):
                return False
        if self.min_urgency is not None:
            rank = Urgency(urgency).rank if urgency in {u.value for u in Urgency} else 0
            if rank < self.min_urgency.rank:
                return False
        return True


class DicomDestination(_Destination):
    """A DICOM Storage SCP (PACS): C-STORE of the SR, optionally Storage Commitment."""

    kind: Literal["dicom"] = "dicom"
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, max_length=16)
    tls: TlsConfig | None = None
    storage_commitment: bool = False
    timeout: float = 30.0
    sends: tuple[Literal["sr"], ...] = ("sr",)


class DicomWebDestination(_Destination):
    """A DICOMweb origin server: STOW-RS of the SR to ``url`` + ``/studies``."""

    kind: Literal["dicomweb"] = "dicomweb"
    url: str
    token: str | None = None
    timeout: float = 30.0
    sends: tuple[Literal["sr"], ...] = ("sr",)


class FhirDestination(_Destination):
    """A FHIR server: a transaction Bundle POSTed to its base URL."""

    kind: Literal["fhir"] = "fhir"
    url: str
    token: str | None = None
    timeout: float = 30.0
    sends: tuple[Literal["fhir"], ...] = ("fhir",)


class WebhookDestination(_Destination):
    """Signed JSON POSTed to a URL (HMAC-SHA256 in ``X-Preread-Signature``)."""

    kind: Literal["webhook"] = "webhook"
    url: str
    secret: str | None = None
    timeout: float = 10.0
    sends: tuple[Literal["webhook"], ...] = ("webhook",)


class Hl7Destination(_Destination):
    """A RIS accepting HL7 v2: an ORU^R01 (result status P) over MLLP."""

    kind: Literal["hl7"] = "hl7"
    host: str
    port: int = Field(ge=1, le=65535)
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    timeout: float = 30.0
    sends: tuple[Literal["hl7"], ...] = ("hl7",)


class FolderDestination(_Destination):
    """Files in a folder (default the data dir's ``exports``), one per study and kind sent."""

    kind: Literal["folder"] = "folder"
    path: Path | None = None
    sends: tuple[Sendable, ...] = ("fhir",)


Destination = Annotated[
    DicomDestination | DicomWebDestination | FhirDestination | WebhookDestination | Hl7Destination | FolderDestination,
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[list[Destination]] = TypeAdapter(list[Destination])


def parse_destinations(raw: Sequence[dict[str, Any]]) -> list[Destination]:
    """Validate ``[[destinations]]`` tables; one error line per wrong field, naming the destination."""
    try:
        parsed = _ADAPTER.validate_python(list(raw))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            index = loc[0] if loc and isinstance(loc[0], int) else None
            name = raw[index].get("name", f"#{index + 1}") if index is not None and isinstance(raw[index], dict) else "?"
            field = ".".join(str(part) for part in loc[2:]) or "kind"
            lines.append(f"destination {name!r}: {field}: {err['msg']}")
        raise DestinationError("; ".join(lines)) from None
    seen: set[str] = set()
    for dest in parsed:
        if dest.name in seen:
            raise DestinationError(f"destination {dest.name!r} is named twice; give each [[destinations]] a unique name")
        seen.add(dest.name)
    return parsed


def destinations_from_settings(settings: Settings) -> list[Destination]:
    """The configured destinations plus the implicit ones of the shorthand settings."""
    raw = list(getattr(settings, "destinations", None) or [])
    out = parse_destinations([dict(d) if not isinstance(d, BaseModel) else d.model_dump() for d in raw])
    names = {d.name for d in out}
    if getattr(settings, "export_fhir", False) and IMPLICIT_FHIR_FILE not in names:
        out.append(FolderDestination(name=IMPLICIT_FHIR_FILE, sends=("fhir",)))
    webhook_url = getattr(settings, "webhook_url", None)
    if webhook_url and IMPLICIT_WEBHOOK not in names:
        out.append(WebhookDestination(name=IMPLICIT_WEBHOOK, url=webhook_url, secret=getattr(settings, "webhook_secret", None)))
    return out

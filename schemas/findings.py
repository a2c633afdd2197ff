"""The draft report schema: what the model must produce and what the database keeps.

The JSON schema of :class:`DraftReport` is what constrained decoding enforces,
so every bound here (string lengths, list lengths, enums) is also a bound on
the number of generated tokens.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

#: Printable text without ``<`` or ``|`` (they would start special tokens) and without quotes/backslashes.
SAFE_TEXT = r"^[^<|\"\\\x00-\x1f]*$"

MAX_FINDINGS = 8
MAX_FINDING_CHARS = 160
MAX_IMPRESSION_CHARS = 400
MAX_ANATOMY_CHARS = 48


class Presence(enum.StrEnum):
    """Whether the finding is there."""

    PRESENT = "present"
    ABSENT = "absent"
    UNCERTAIN = "uncertain"


class Laterality(enum.StrEnum):
    """Side of the body, as in DICOM Laterality / Image Laterality."""

    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"
    NONE = "none"


class Severity(enum.StrEnum):
    """Coarse severity of a finding."""

    NONE = "none"
    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"


class Urgency(enum.StrEnum):
    """Reading-queue priority of a study, from lowest to highest."""

    ROUTINE = "routine"
    PRIORITY = "priority"
    STAT = "stat"

    @property
    def rank(self) -> int:
        """0 for routine, 1 for priority, 2 for stat."""
        return [Urgency.ROUTINE, Urgency.PRIORITY, Urgency.STAT].index(self)


class FindingModel(BaseModel):
    """One observation in the draft."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_FINDING_CHARS, pattern=SAFE_TEXT)
    anatomy: str = Field(max_length=MAX_ANATOMY_CHARS, pattern=SAFE_TEXT)
    laterality: Laterality
    presence: Presence
    severity: Severity


class DraftReport(BaseModel):
    """A pre-read draft: findings, impression and overall urgency."""

    model_config = ConfigDict(extra="forbid")

    findings: list[FindingModel] = Field(min_length=1, max_length=MAX_FINDINGS)
    impression: str = Field(min_length=1, max_length=MAX_IMPRESSION_CHARS, pattern=SAFE_TEXT)
    urgency: Urgency

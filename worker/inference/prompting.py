"""Versioned prompt files, chosen by modality and body part.

Prompts live in ``worker/prompts/*.toml`` (or a folder from settings). The
version recorded with every result is the file's declared ``version`` plus a
hash of its bytes, so any edit to a prompt changes what results record.
A prompt may carry modality, body part, study description, patient age and
sex; :class:`StudyContext` has no field for a name or an ID, by design.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The packaged prompts.
DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "preread.toml"

#: Characters kept in context values: no quotes, angle brackets or pipes (special tokens), no control characters.
_UNSAFE = re.compile(r"[^A-Za-z0-9 .,;:()/+\-^_]")


@dataclass(frozen=True)
class StudyContext:
    """What a prompt may say about a study. Deliberately has no name, ID or birth date."""

    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    patient_age: str | None = None
    patient_sex: str | None = None


@dataclass(frozen=True)
class Profile:
    """A modality/body-part profile: the region phrase and its probe questions."""

    name: str
    region: str
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    probes: tuple[tuple[str, str], ...]

    def matches(self, modality: str, body_part: str) -> bool:
        """True when modality and body part (upper case, '' if unknown) fit this profile."""
        return (not self.modalities or modality in self.modalities) and (
            not self.body_parts or body_part in self.body_parts
        )


@dataclass(frozen=True)
class PromptSet:
    """One loaded prompt file and its recorded version."""

    path: Path
    version: str
    data: dict[str, Any]
    profiles: tuple[Profile, ...]

    def profile(self, ctx: StudyContext) -> Profile:
        """The first profile matching the study (the last one is the catch-all)."""
        modality = _clean(ctx.modality).upper()
        body_part = _clean(ctx.body_part).upper()
        for profile in self.profiles:
            if profile.matches(modality, body_part):
                return profile
        return self.profiles[-1]

    def draft_prompt(self, ctx: StudyContext, mode: str, think: bool) -> str:
        """The user text of a draft request (``mode`` 'json' or 'text')."""
        template = self.data["draft"][mode]
        text = template.format(context=context_text(ctx), region=self.profile(ctx).region).strip()
        return self._with_think(text, think)

    def probe_questions(self, ctx: StudyContext) -> list[tuple[str, str]]:
        """(condition, full question text) for each probe of the study's profile."""
        suffix = self.data.get("probe", {}).get("suffix", "Answer with yes or no.")
        context = context_text(ctx)
        return [(cond, f"{context}\n{question} {suffix}".strip()) for cond, question in self.profile(ctx).probes]

    @property
    def system(self) -> str | None:
        """The system message, if the file has one."""
        return self.data.get("system")

    def _with_think(self, text: str, think: bool) -> str:
        if think and self.data.get("think_instruction"):
            return f"{text}\n{self.data['think_instruction']}"
        return text


def _clean(value: str | None, limit: int = 64) -> str:
    """A context value made safe for a prompt: allowed characters only, bounded length."""
    if not value:
        return ""
    return _UNSAFE.sub(" ", str(value)).strip()[:limit]


def context_text(ctx: StudyContext) -> str:
    """One line about the study: modality, body part, description, age, sex (never a name or an ID)."""
    parts = []
    for label, value in (
        ("Modality", ctx.modality),
        ("Body part", ctx.body_part),
        ("Study", ctx.study_description),
        ("Patient age", ctx.patient_age),
        ("Patient sex", ctx.patient_sex),
    ):
        cleaned = _clean(value)
        if cleaned:
            parts.append(f"{label}: {cleaned}.")
    return " ".join(parts)


def load_prompts(path: Path | str | None = None) -> PromptSet:
    """Load a prompt file (default: the packaged one); cached per path and content."""
    path = Path(path) if path else DEFAULT_PROMPTS
    if path.is_dir():
        path = path / "preread.toml"
    raw = path.read_bytes()
    return _parse(str(path), raw)


@lru_cache(maxsize=16)
def _parse(path: str, raw: bytes) -> PromptSet:
    data = tomllib.loads(raw.decode("utf-8"))
    digest = hashlib.sha256(raw).hexdigest()[:12]
    profiles = tuple(
        Profile(
            name=p["name"],
            region=p.get("region", "radiology"),
            modalities=tuple(m.upper() for m in p.get("modalities", [])),
            body_parts=tuple(b.upper() for b in p.get("body_parts", [])),
            probes=tuple((str(k), str(v)) for k, v in p.get("probes", {}).items()),
        )
        for p in data.get("profile", [])
    )
    if not profiles:
        raise ValueError(f"{path}: no [[profile]] sections")
    return PromptSet(path=Path(path), version=f"{Path(path).stem}-{data.get('version', '0')}+{digest}", data=data, profiles=profiles)

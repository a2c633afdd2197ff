"""Turning raw model output into a :class:`DraftReport`, never dropping it.

The answer is separated from an InfiMed-RL ``<think>…</think>`` block, then
parsed as the constrained JSON or as MedEvalKit-style free text
(``Findings: … Impression: …``). A parse failure yields ``INVALID`` with the
reason; the raw text is always kept by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import ValidationError

from preread.schemas.findings import (
    MAX_FINDING_CHARS,
    MAX_FINDINGS,
    MAX_IMPRESSION_CHARS,
    DraftReport,
    FindingModel,
    Laterality,
    Presence,
    Severity,
    Urgency,
)
from preread.schemas.tables import ParseStatus

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_UNSAFE_TEXT = re.compile(r'[<|"\\\x00-\x1f]')


@dataclass(frozen=True)
class Parsed:
    """What came out of the raw text."""

    thinking: str | None
    answer: str
    report: DraftReport | None
    status: ParseStatus
    error: str | None


def split_thinking(raw: str) -> tuple[str | None, str]:
    """(thinking, answer): the first ``<think>`` block kept apart from what follows it."""
    match = _THINK.search(raw)
    if match is None:
        return None, raw.strip()
    thinking = match.group(1).strip()
    answer = (raw[: match.start()] + raw[match.end() :]).strip()
    return thinking, answer


def parse_json_answer(answer: str) -> DraftReport:
    """Validate the answer (a JSON document, possibly fenced) against the schema."""
    text = answer.strip()
    if text.startswith("```"):
        text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
    return DraftReport.model_validate_json(text)


def _safe(text: str, limit: int) -> str:
    """Text made valid for a schema string: forbidden characters replaced, bounded length."""
    return re.sub(r"\s+", " ", _UNSAFE_TEXT.sub(" ", text)).strip()[:limit].strip()


def _finding_from_sentence(sentence: str) -> FindingModel:
    """A finding from one free-text sentence, with laterality/presence/severity from keywords."""
    low = sentence.lower()
    if "bilateral" in low or ("left" in low and "right" in low):
        laterality = Laterality.BILATERAL
    elif re.search(r"\bleft\b", low):
        laterality = Laterality.LEFT
    elif re.search(r"\bright\b", low):
        laterality = Laterality.RIGHT
    else:
        laterality = Laterality.NONE
    if re.search(r"\b(possible|possibly|may|might|cannot be excluded|cannot exclude|questionable|suspected|likely)\b", low):
        presence = Presence.UNCERTAIN
    elif re.search(r"\b(no|without|negative for|absent|clear|normal|unremarkable)\b", low):
        presence = Presence.ABSENT
    else:
        presence = Presence.PRESENT
    severity = Severity.NONE
    for word, level in (("severe", Severity.SEVERE), ("moderate", Severity.MODERATE), ("mild", Severity.MILD), ("small", Severity.MILD), ("large", Severity.SEVERE)):
        if word in low:
            severity = level
            break
    return FindingModel(text=_safe(sentence, MAX_FINDING_CHARS), anatomy="", laterality=laterality, presence=presence, severity=severity)


_SECTION = re.compile(r"(?is)findings?\s*:\s*(?P<findings>.*?)\s*impressions?\s*:\s*(?P<impression>.*)$")


def parse_text_answer(answer: str) -> DraftReport:
    """Parse ``Findings: … Impression: …`` free text into the schema (urgency routine; probes raise it)."""
    match = _SECTION.search(answer)
    if match is None:
        raise ValueError("no 'Findings:' followed by 'Impression:' in the output")
    findings_text = match.group("findings").strip().strip("{}").strip()
    impression = _safe(match.group("impression").strip().strip("{}"), MAX_IMPRESSION_CHARS)
    sentences = [s.strip(" -*\t") for s in re.split(r"(?<=[.;])\s+|\n+", findings_text)]
    findings = [_finding_from_sentence(s) for s in sentences if _safe(s, MAX_FINDING_CHARS)][:MAX_FINDINGS]
    if not findings:
        raise ValueError("empty findings section")
    if not impression:
        raise ValueError("empty impression")
    urgency = Urgency.STAT if re.search(r"\b(urgent|emergen|critical|stat)\w*", impression.lower()) else Urgency.ROUTINE
    return DraftReport(findings=findings, impression=impression, urgency=urgency)


def parse_output(raw: str, mode: str) -> Parsed:
    """Parse raw model output in ``mode`` ('json' or 'text')."""
    thinking, answer = split_thinking(raw)
    if not answer:
        return Parsed(thinking, answer, None, ParseStatus.EMPTY, "no answer in the output")
    try:
        report = parse_json_answer(answer) if mode == "json" else parse_text_answer(answer)
    except (ValidationError, ValueError) as exc:
        return Parsed(thinking, answer, None, ParseStatus.INVALID, str(exc)[:2000])
    return Parsed(thinking, answer, report, ParseStatus.OK, None)

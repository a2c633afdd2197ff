"""A study's urgency as the worklist shows it, and why it differs from the draft's own."""

from __future__ import annotations

from preread.schemas.findings import Urgency

RANKED = (Urgency.ROUTINE, Urgency.PRIORITY, Urgency.STAT)


def from_rank(rank: int) -> Urgency:
    """The urgency of a rank (0 routine, 1 priority, 2 stat); out-of-range ranks are clamped."""
    return RANKED[max(0, min(rank, len(RANKED) - 1))]


def _rank(value: str | None) -> int:
    try:
        return Urgency(value).rank if value else 0
    except ValueError:
        return 0


def urgency_reason(
    study_rank: int, triage: str | None, report_urgency: str | None, top_probe: tuple[str, float] | None
) -> str | None:
    """Why the study's urgency differs from its draft's (None when they agree).

    ``study_rank`` is the study's priority (the order's request or the triage, whichever is higher);
    ``triage`` what the probes and draft together decided; ``report_urgency`` the draft's own.
    """
    if report_urgency is None or study_rank == _rank(report_urgency):
        return None
    if study_rank > _rank(triage):
        return f"the order asked for {from_rank(study_rank)}"
    if study_rank > _rank(report_urgency) and top_probe is not None:
        condition, score = top_probe
        return f"probe {condition} scored {score:.2f}, above its threshold"
    return f"the draft says {report_urgency}"

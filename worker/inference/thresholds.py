"""Per-probe decision thresholds, from the prompt profile, defaulting to the global settings.

A probe's score at or above its ``priority`` threshold is a positive call (the
reading queue's sensitivity/specificity, the SR and FHIR outputs); at or above
``stat`` it makes the study stat. A profile may override either per probe:

    [profile.thresholds]
    pneumothorax = 0.4                                # priority only
    haemorrhage = { priority = 0.3, stat = 0.7 }
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preread.schemas.settings import Settings
from preread.worker.inference.prompting import PromptSet, load_prompts


@dataclass(frozen=True, slots=True)
class ProbeThreshold:
    """Scores from which a probe calls a study priority, and stat."""

    priority: float
    stat: float


def _threshold(raw: Any, default: ProbeThreshold) -> ProbeThreshold:
    if isinstance(raw, (int, float)):
        return ProbeThreshold(float(raw), default.stat)
    if isinstance(raw, dict):
        return ProbeThreshold(float(raw.get("priority", default.priority)), float(raw.get("stat", default.stat)))
    raise ValueError(f"probe threshold must be a number or {{priority, stat}}, not {raw!r}")


def probe_thresholds(settings: Settings, prompts: PromptSet | None = None) -> dict[str, ProbeThreshold]:
    """The threshold of every probe named in the prompt file; the first profile naming a probe wins."""
    prompts = prompts or load_prompts(settings.prompts_path)
    default = ProbeThreshold(settings.priority_threshold, settings.stat_threshold)
    out: dict[str, ProbeThreshold] = {}
    for section in prompts.data.get("profile", []):
        overrides = section.get("thresholds", {}) or {}
        for condition in (section.get("probes", {}) or {}):
            if condition not in out:
                out[condition] = _threshold(overrides[condition], default) if condition in overrides else default
    return out


def threshold_for(thresholds: dict[str, ProbeThreshold], condition: str, settings: Settings) -> ProbeThreshold:
    """One probe's threshold; a probe the prompt file no longer names gets the global ones."""
    return thresholds.get(condition) or ProbeThreshold(settings.priority_threshold, settings.stat_threshold)

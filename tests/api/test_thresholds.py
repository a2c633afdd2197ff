"""Per-probe thresholds from the prompt profile, defaulting to the global settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from preread.schemas.settings import Settings
from preread.worker.inference.prompting import DEFAULT_PROMPTS, load_prompts
from preread.worker.inference.thresholds import ProbeThreshold, probe_thresholds, threshold_for


def test_profile_overrides_and_global_defaults(tmp_path: Path) -> None:
    text = DEFAULT_PROMPTS.read_text().replace(
        '[profile.probes]\npneumothorax = "Is there a pneumothorax?"',
        '[profile.thresholds]\npneumothorax = 0.3\ncardiomegaly = { priority = 0.6, stat = 0.95 }\n'
        '[profile.probes]\npneumothorax = "Is there a pneumothorax?"',
        1,
    )
    assert text != DEFAULT_PROMPTS.read_text()
    path = tmp_path / "preread.toml"
    path.write_text(text)
    settings = Settings(prompts_path=path, priority_threshold=0.45, stat_threshold=0.8)
    thresholds = probe_thresholds(settings, load_prompts(path))
    assert thresholds["pneumothorax"] == ProbeThreshold(0.3, 0.8)
    assert thresholds["cardiomegaly"] == ProbeThreshold(0.6, 0.95)
    assert thresholds["fracture"] == ProbeThreshold(0.45, 0.8), "a probe without an override gets the global ones"
    assert threshold_for(thresholds, "no_such_probe", settings) == ProbeThreshold(0.45, 0.8)


def test_packaged_prompts_use_the_global_thresholds() -> None:
    settings = Settings()
    thresholds = probe_thresholds(settings)
    assert thresholds and set(thresholds.values()) == {ProbeThreshold(settings.priority_threshold, settings.stat_threshold)}


def test_a_malformed_threshold_is_named(tmp_path: Path) -> None:
    path = tmp_path / "preread.toml"
    path.write_text(DEFAULT_PROMPTS.read_text().replace(
        '[profile.probes]\npneumothorax', '[profile.thresholds]\npneumothorax = "high"\n[profile.probes]\npneumothorax', 1))
    with pytest.raises(ValueError, match="probe threshold"):
        probe_thresholds(Settings(prompts_path=path), load_prompts(path))

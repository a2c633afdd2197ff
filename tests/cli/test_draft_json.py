"""``preread draft --json`` shows the probe scores, the study's urgency and why, and what the model did not see."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pydicom.uid import generate_uid

from preread.cli.draft import urgency_reason
from preread.schemas.settings import Settings
from tests.support.procs import base_env, preread_argv
from tests.support.synthetic import ct_series


def test_draft_json_has_probes_urgency_and_not_shown(tmp_path: Path, tiny_model_dir: Path) -> None:
    st = generate_uid()
    src = tmp_path / "in"
    ct_series(src, study_uid=st, n=8, series_number=2)
    fewer = ct_series(src, study_uid=st, n=3, series_number=3)
    (src / "notes.txt").write_text("a text file, not an image\n")
    # every probe score reaches both thresholds: the probes make the study stat, whatever the report says
    env = base_env(data_dir=tmp_path / "data", model=tiny_model_dir, device="cpu", max_images=2,
                   priority_threshold=0.0, stat_threshold=0.0)
    result = subprocess.run(preread_argv("draft", str(src), "--json"), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "notes.txt: not DICOM" in " ".join(result.stderr.split()) and "force" not in result.stderr
    [draft] = json.loads(result.stdout)

    probes = draft["probe_scores"]
    assert len(probes) >= 1
    assert all(set(p) == {"condition", "question", "score"} and 0.0 <= p["score"] <= 1.0 for p in probes)
    assert [p["score"] for p in probes] == sorted((p["score"] for p in probes), reverse=True)
    assert draft["urgency"] == "stat"
    top = probes[0]
    if draft["report_urgency"] == "stat":
        assert draft["urgency_reason"].startswith("stat: the report's urgency, and the probes agree")
    elif draft["report_urgency"] is None:
        assert draft["urgency_reason"].startswith("stat: from the probes, the report has no urgency")
    else:
        assert draft["urgency_reason"].startswith(f"stat, not the report's {draft['report_urgency']}: raised by the probes")
    assert f"{top['condition']}, scored {top['score']:.2f}" in draft["urgency_reason"]

    series = draft["not_shown"]["series"]
    assert [(s["series_number"], s["reason"]) for s in series] == [(3, "fewer slices than the chosen series (3 < 8)")]
    listed = {e["file"] for e in draft["not_shown"]["instances"]}
    assert {str(p.resolve()) for p in fewer} <= listed
    assert len(listed) == 8 + 3 - 2


def test_urgency_reason_says_why_the_study_differs_from_its_report() -> None:
    settings = Settings(priority_threshold=0.5, stat_threshold=0.85)
    probes = [{"condition": "pneumothorax", "question": "?", "score": 0.91}, {"condition": "mass", "question": "?", "score": 0.2}]
    assert urgency_reason("stat", "priority", probes, settings) == (
        "stat, not the report's priority: raised by the probes: the top probe, pneumothorax, scored 0.91 "
        "(PREREAD_PRIORITY_THRESHOLD=0.5, PREREAD_STAT_THRESHOLD=0.85)"
    )
    low = [{"condition": "mass", "question": "?", "score": 0.1}]
    assert urgency_reason("priority", "priority", low, settings).startswith("priority: the report's urgency, higher than the probes'")
    assert urgency_reason("routine", "routine", low, settings).startswith("routine: the report's urgency, and the probes agree")
    assert urgency_reason("routine", None, [], settings) == "routine: from the probes, the report has no urgency (unparsed); no probe scores"

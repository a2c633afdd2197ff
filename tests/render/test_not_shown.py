"""The manifest names every series and instance the model does not see, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.uid import generate_uid

from preread.ingest.render import read_manifest, render_study
from tests.support.synthetic import ct_series, dose_sr, save

CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def test_manifest_lists_what_was_not_shown_and_why(tmp_path: Path) -> None:
    st = generate_uid()
    src = tmp_path / "in"
    chosen = ct_series(src, study_uid=st, n=12, series_number=2)
    fewer = ct_series(src, study_uid=st, n=5, series_number=3)
    secondary = ct_series(src, study_uid=st, n=30, series_number=4, image_type=("DERIVED", "SECONDARY", "AXIAL"))
    coronal = ct_series(src, study_uid=st, n=30, series_number=5, orientation=CORONAL, image_type=("ORIGINAL", "PRIMARY", "REFORMATTED"))
    scout = ct_series(src, study_uid=st, n=1, series_number=1, description="Scout", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    dose = save(dose_sr(study_uid=st, series_uid=generate_uid()), src)
    files = chosen + fewer + secondary + coronal + scout + [dose]

    result = render_study(files, tmp_path / "out", max_images=4, min_pixels=None, max_pixels=None)
    manifest = json.loads(result.manifest_path.read_text())
    not_shown = manifest["not_shown"]

    series = {s["series_number"]: s["reason"] for s in not_shown["series"]}
    assert set(series) == {1, 3, 4, 5, 998}, "every series but the chosen one (2)"
    assert series[1] == "localizer"
    assert series[3] == "fewer slices than the chosen series (5 < 12)"
    assert series[4].startswith("secondary")
    assert series[5].startswith("not axial")
    assert series[998] == "dose report"

    reasons = {entry["file"]: entry["reason"] for entry in not_shown["instances"]}
    shown = {str(i.path) for i in result.images}
    assert len(result.images) == 4
    assert len(reasons) == len(files) - 4, "every instance not shown is listed once"
    assert reasons[str(scout[0])] == "localizer" and reasons[str(dose)] == "dose report"
    assert reasons[str(fewer[0])] == "series not shown: fewer slices than the chosen series (5 < 12)"
    over_limit = [f for f in chosen if str(f) in reasons]
    assert len(over_limit) == 8 and all(reasons[str(f)].startswith("over the image limit: 4 of 12 frames") for f in over_limit)
    assert not shown & set(reasons)
    assert read_manifest(result.manifest_path).not_shown == not_shown


def test_unreadable_files_are_listed_as_not_shown(tmp_path: Path) -> None:
    st = generate_uid()
    files = ct_series(tmp_path / "in", study_uid=st, n=3, series_number=2)
    bad = tmp_path / "in" / "garbage.dcm"
    bad.write_bytes(b"not dicom at all")
    result = render_study(files + [bad], tmp_path / "out", max_images=3, min_pixels=None, max_pixels=None)
    entries = [e for e in result.not_shown["instances"] if e["file"] == str(bad)]
    assert len(entries) == 1 and entries[0]["reason"].startswith("unreadable: ")
    assert result.not_shown["series"] == []

"""render_study end to end: selection, budget, PNGs, manifest and ``images`` rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from preread.ingest.render import RenderError, WindowSpec, read_manifest, render_study, store_images
from tests.support.synthetic import ct_series, dose_sr, save
from tests.conftest import testdata

MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28


def _study(tmp_path: Path) -> list[Path]:
    st = generate_uid()
    files = ct_series(tmp_path / "in", study_uid=st, n=9, series_number=2)
    files += ct_series(tmp_path / "in", study_uid=st, n=20, series_number=3, spacing=1.0, rows=96, columns=80)
    files.append(save(dose_sr(study_uid=st, series_uid=generate_uid()), tmp_path / "in"))
    return files


def test_render_study_writes_pngs_and_manifest(tmp_path: Path) -> None:
    files = _study(tmp_path)
    bad = tmp_path / "in" / "garbage.dcm"
    bad.write_bytes(b"not dicom at all")
    out = tmp_path / "out"
    result = render_study(files + [bad], out, max_images=3, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert len(result.images) == 3
    assert [i.ordinal for i in result.images] == [0, 1, 2]
    assert [p for p, _ in result.errors] == [bad]
    assert [k for _, k in result.skipped] == ["dose_report"]
    series = {i.series_instance_uid for i in result.images}
    assert len(series) == 1
    for image in result.images:
        png = PILImage.open(image.path)
        assert png.mode == "L" and png.size == (image.width, image.height)
        assert image.width % 28 == 0 and image.height % 28 == 0
        assert MIN_PIXELS <= image.width * image.height <= MAX_PIXELS
        assert (image.window, image.window_center, image.window_width) == ("dataset", 40.0, 400.0)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["version"] == 1 and len(manifest["images"]) == 3
    assert manifest["images"][0]["file"] == result.images[0].path.name
    assert "PatientName" not in result.manifest_path.read_text() and "Synthetic" not in result.manifest_path.read_text()
    assert read_manifest(out).images == result.images

    # Rendering again with a preset and fewer images replaces the PNGs.
    again = render_study(files, out, max_images=1, min_pixels=None, max_pixels=None, window=WindowSpec.from_preset("brain"))
    assert len(again.images) == 1 and again.images[0].window == "preset:brain"
    assert (again.images[0].width, again.images[0].height) == (80, 96)  # full resolution without a budget
    assert sorted(p.name for p in out.glob("*.png")) == [again.images[0].path.name]


def test_render_study_real_ct_and_mr(tmp_path: Path) -> None:
    result = render_study([testdata("CT_small.dcm"), testdata("MR_small.dcm")], tmp_path, max_images=4, min_pixels=None, max_pixels=None)
    # One volume series is chosen: CT_small (CT preferred on a tie); no window in it: percentile.
    assert len(result.images) == 1 and result.images[0].window == "percentile"
    mr = render_study([testdata("MR_small.dcm")], tmp_path / "mr", max_images=4, min_pixels=None, max_pixels=None)
    assert mr.images[0].window == "dataset" and mr.images[0].window_center == 600.0


def test_render_study_enhanced_multiframe_by_position(tmp_path: Path) -> None:
    result = render_study([testdata("eCT_Supplemental.dcm")], tmp_path, max_images=4, min_pixels=None, max_pixels=None)
    assert sorted(i.frame for i in result.images) == [0, 1]  # both frames once; their order is by position:
    positions = [i.slice_position for i in result.images]
    assert None not in positions and positions == sorted(positions)  # type: ignore[type-var]
    assert all(i.window_center == 49.0 and i.window_width == 102.0 for i in result.images)  # per-frame VOI


def test_bad_file_replaced_by_next_candidate(tmp_path: Path) -> None:
    files = _study(tmp_path)
    target = files[9 + 10]  # the long series' middle slice: the one chosen when max_images=1
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) - 500])  # truncated pixel data
    result = render_study(files, tmp_path / "out", max_images=1, min_pixels=None, max_pixels=None)
    assert len(result.images) == 1
    assert result.images[0].sop_instance_uid != dcmread(target, stop_before_pixels=True).SOPInstanceUID
    assert result.images[0].series_instance_uid == dcmread(target, stop_before_pixels=True).SeriesInstanceUID
    assert [(p, "pixel data" in r) for p, r in result.errors] == [(target, True)]


def test_nothing_renderable_raises(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="nothing in the study"):
        render_study([testdata("reportsi.dcm"), tmp_path / "missing.dcm"], tmp_path, max_images=4, min_pixels=None, max_pixels=None)


def test_store_images_replaces_rows(db_url: str, tmp_path: Path) -> None:
    from preread.ingest.assembly.catalog import record_instance
    from preread.schemas.database import session_scope
    from preread.schemas.tables import Image

    files = _study(tmp_path)
    with session_scope(db_url) as session:
        study_ids = {record_instance(session, dcmread(p, stop_before_pixels=True), p, p.stat().st_size)[0] for p in files}
    (study_id,) = study_ids
    result = render_study(files, tmp_path / "out", max_images=4, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    for _ in range(2):  # idempotent: the second call replaces, not appends
        with session_scope(db_url) as session:
            store_images(session, study_id, result)
    with session_scope(db_url) as session:
        rows = session.execute(select(Image).where(Image.study_id == study_id).order_by(Image.ordinal)).scalars().all()
        assert [r.ordinal for r in rows] == [0, 1, 2, 3]
        assert all(r.instance_id is not None for r in rows)
        assert [(r.sop_instance_uid, r.frame, r.path, r.width, r.height, r.window) for r in rows] == [
            (i.sop_instance_uid, i.frame, str(i.path), i.width, i.height, i.window) for i in result.images
        ]
        assert all(np.isclose(r.window_center, 40.0) for r in rows)

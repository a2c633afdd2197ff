"""The pixel pipeline on pydicom-data's real files: codecs, multi-frame, colour, errors, windows."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_windowing

from preread.ingest.render import (
    PRESETS,
    ImagePixel,
    UnreadableInstance,
    VOIFunction,
    VOIWindow,
    WindowSpec,
    parse_window,
    read_instance,
    render_frame,
)
from preread.ingest.render.pixels import frame_transforms
from tests.conftest import testdata

#: (lossless-compressed file, its uncompressed twin): JPEG 2000 lossless, JPEG lossless, JPEG-LS lossless, RLE.
TWINS = [
    ("693_J2KR.dcm", "693_UNCR.dcm"),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
    ("US1_J2KR.dcm", "US1_UNCR.dcm"),
    ("examples_jpeg2k.dcm", "US1_UNCR.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),
    ("SC_rgb_gdcm2k_uncompressed.dcm", "SC_rgb.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
    ("SC_rgb_rle_2frame.dcm", "SC_rgb_2frame.dcm"),
    ("SC_rgb_rle_16bit.dcm", "SC_rgb_16bit.dcm"),
    ("SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_16bit_2frame.dcm"),
    ("SC_rgb_rle_32bit_2frame.dcm", "SC_rgb_32bit_2frame.dcm"),
    ("OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_2frame.dcm"),
    ("rtdose_rle.dcm", "rtdose.dcm"),
]


def _read(name: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_instance(testdata(name))


@pytest.mark.parametrize(("compressed", "plain"), TWINS, ids=[c for c, _ in TWINS])
def test_lossless_renders_identically_to_uncompressed_twin(compressed: str, plain: str) -> None:
    a, b = _read(compressed), _read(plain)
    frames = ImagePixel.of(b).number_of_frames
    assert ImagePixel.of(a).number_of_frames == frames
    for frame in range(frames):
        ra, rb = render_frame(a, frame), render_frame(b, frame)
        assert ra.window == rb.window
        np.testing.assert_array_equal(ra.pixels, rb.pixels)


@pytest.mark.parametrize(
    ("name", "frames", "shape"),
    [
        ("emri_small.dcm", 10, (64, 64)),
        ("eCT_Supplemental.dcm", 2, (512, 512)),
        ("rtdose.dcm", 15, (10, 10)),
        ("OBXXXX1A_2frame.dcm", 2, (600, 800, 3)),
        ("SC_rgb_32bit_2frame.dcm", 2, (100, 100, 3)),
        ("color3d_jpeg_baseline.dcm", 120, (480, 640, 3)),
        ("examples_ybr_color.dcm", 30, (240, 320, 3)),
        ("SC_ybr_full_uncompressed.dcm", 1, (100, 100, 3)),
        ("US1_J2KI.dcm", 1, (480, 640, 3)),
        ("gdcm-US-ALOKA-16.dcm", 1, (480, 640, 3)),
        ("JPEG2000.dcm", 1, (1024, 256)),
        ("liver.dcm", 3, (512, 512)),
    ],
)
def test_multiframe_and_colour_render(name: str, frames: int, shape: tuple[int, ...]) -> None:
    ds = _read(name)
    assert ImagePixel.of(ds).number_of_frames == frames
    for frame in sorted({0, frames - 1}):
        out = render_frame(ds, frame)
        assert out.pixels.dtype == np.uint8 and out.pixels.shape == shape
        assert out.pixels.max() > out.pixels.min()


def test_ybr_and_rgb_agree() -> None:
    """YBR_FULL is converted to RGB: the same picture as its RGB original (the YBR file was made with 8-bit rounding)."""
    rgb = render_frame(_read("SC_rgb.dcm")).pixels.astype(int)
    ybr = render_frame(_read("SC_ybr_full_uncompressed.dcm")).pixels.astype(int)
    assert np.abs(rgb - ybr).max() <= 8 and np.abs(rgb - ybr).mean() < 1


def test_enhanced_per_frame_window_and_rescale() -> None:
    ds = _read("eCT_Supplemental.dcm")
    tf = frame_transforms(ds, 1)
    assert float(tf.view.RescaleIntercept) == -1024.0
    assert tf.windows[0].center == 49.0 and tf.windows[0].width == 102.0
    out = render_frame(ds, 1)
    assert (out.window, out.window_center, out.window_width) == ("dataset", 49.0, 102.0)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "pixel data"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated"),
        ("reportsi.dcm", "no pixel data"),
        ("rtplan.dcm", "no pixel data"),
    ],
)
def test_truncated_or_pixelless_give_clear_error(name: str, reason: str) -> None:
    with pytest.raises(UnreadableInstance, match=reason):
        render_frame(read_instance(testdata(name)))


def test_not_dicom_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    with pytest.raises(UnreadableInstance):
        render_frame(read_instance(junk))
    with pytest.raises(UnreadableInstance, match="not found"):
        read_instance(tmp_path / "nope.dcm")


def test_monochrome1_is_inverted() -> None:
    ds = _read("RG3_UNCR.dcm")
    spec = WindowSpec.explicit(550, 1024)
    out = render_frame(ds, 0, spec).pixels.astype(int)
    ds.PhotometricInterpretation = "MONOCHROME2"
    flipped = render_frame(ds, 0, spec).pixels.astype(int)
    assert np.abs(out - (255 - flipped)).max() <= 1


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(40.0, 400.0), (-600.0, 1500.0), (0.5, 1.0), (100.0, 2.0), (2047.5, 4096.0)])
def test_window_formula_equals_pydicom(function: str, center: float, width: float) -> None:
    """VOIWindow.apply is PS3.3 C.11.2.1.2 as pydicom's apply_windowing computes it."""
    if function != "LINEAR" and width == 1.0:
        width = 0.5
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 16
    ds.PixelRepresentation = 1
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    x = np.arange(-32768, 32768, dtype=np.int32)
    expected = (apply_windowing(x.copy(), ds) + 32768.0) / 65535.0
    got = VOIWindow(center, width, VOIFunction(function)).apply(x)
    assert np.abs(got - expected).max() < 1e-5


def test_dataset_default_then_voi_lut_then_percentile() -> None:
    assert render_frame(_read("MR_small.dcm")).window == "dataset"
    assert render_frame(_read("vlut_04.dcm")).window == "voi_lut"
    out = render_frame(_read("CT_small.dcm"))
    assert out.window == "percentile" and out.window_width and out.window_width > 0
    assert render_frame(_read("MR_small.dcm"), 0, WindowSpec.percentile()).window == "percentile"


def test_presets_and_parsing() -> None:
    for name, (c, w) in {"brain": (40, 80), "subdural": (75, 215), "stroke": (40, 40), "lung": (-600, 1500),
                         "mediastinum": (40, 400), "abdomen": (40, 350), "liver": (60, 160), "bone": (500, 2000)}.items():
        assert PRESETS[name] == (c, w)
        assert parse_window(name).name == f"preset:{name}"
    assert parse_window("-600/1500") == VOIWindow(-600, 1500, VOIFunction.LINEAR, "-600/1500")
    with pytest.raises(KeyError, match="unknown window preset"):
        parse_window("nonsense")


def test_rgb_pack_is_three_single_windows() -> None:
    ds = _read("693_UNCR.dcm")
    packed = render_frame(ds, 0, WindowSpec.rgb(["brain", "subdural", "bone"]))
    assert packed.pixels.shape == (512, 512, 3) and packed.window == "rgb:preset:brain,preset:subdural,preset:bone"
    for channel, name in enumerate(("brain", "subdural", "bone")):
        single = render_frame(ds, 0, WindowSpec.from_preset(name)).pixels
        np.testing.assert_array_equal(packed.pixels[..., channel], single)

"""PNGs equal dcmtk's ``dcmj2pnm`` output within ±1 on every pixel.

Every pydicom-data file that ``dcmj2pnm +Wi 1 -O +on`` can convert (it needs a
window in the file; it cannot decode JPEG 2000) is compared with our default
rendering (the dataset's first window). Explicit windows (``+Ww``), SIGMOID
(``+Wfs``), the VOI LUT Sequence (``+Wl 1``) and colour images are compared too.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preread.ingest.render import VOIFunction, WindowSpec, read_instance, render_frame

DCMJ2PNM = shutil.which("dcmj2pnm")
pytestmark = pytest.mark.skipif(DCMJ2PNM is None, reason="dcmtk dcmj2pnm not installed")


def _all_test_files() -> list[Path]:
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = get_testdata_files("*.dcm")
    return sorted({Path(f) for f in files}, key=lambda p: p.name)


FILES = _all_test_files()
#: Those the issue names: CT, MR with non-unity slope, MONOCHROME1 CR, US.
MUST_COMPARE = {"693_UNCR.dcm", "MR2_UNCR.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "MR_small.dcm"}


def dcmtk(path: Path, tmp_path: Path, *options: str) -> np.ndarray | None:
    """dcmj2pnm's 8-bit PNG of the first frame, or None when it cannot convert the file."""
    out = tmp_path / f"{path.stem}.dcmtk.png"
    proc = subprocess.run([DCMJ2PNM, *options, "-O", "+on", str(path), str(out)], capture_output=True, timeout=60)  # type: ignore[list-item]
    if proc.returncode != 0 or not out.exists():
        return None
    return np.asarray(Image.open(out)).astype(np.int16)


def ours(path: Path, spec: WindowSpec | None = None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return render_frame(read_instance(path), 0, spec).pixels.astype(np.int16)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"{int((diff > 1).sum())} pixels differ by more than 1 (max {int(diff.max())})"


def test_first_window_matches_dcmj2pnm_on_every_file_it_converts(tmp_path: Path) -> None:
    compared, mismatched = [], []
    for path in FILES:
        ref = dcmtk(path, tmp_path, "+Wi", "1")
        if ref is None:  # no window in the file, JPEG 2000, or not an image: dcmj2pnm has no answer
            continue
        compared.append(path.name)
        try:
            assert_close(ours(path), ref)
        except AssertionError as exc:
            mismatched.append(f"{path.name}: {exc}")
    assert not mismatched, "\n".join(mismatched)
    assert MUST_COMPARE <= set(compared), f"not compared: {MUST_COMPARE - set(compared)}"
    assert len(compared) >= 15, f"only {len(compared)} files compared"


def test_required_kinds_were_compared(tmp_path: Path) -> None:
    by_name = {p.name: p for p in FILES}
    missing = MUST_COMPARE - by_name.keys()
    assert not missing, f"pydicom-data lacks {missing}"
    for name in sorted(MUST_COMPARE):
        assert dcmtk(by_name[name], tmp_path, "+Wi", "1") is not None, name


EXPLICIT = [
    ("693_UNCR.dcm", WindowSpec.from_preset("lung"), ("+Ww", "-600", "1500")),
    ("693_UNCR.dcm", WindowSpec.from_preset("bone"), ("+Ww", "500", "2000")),
    ("693_UNCR.dcm", WindowSpec.explicit(40, 400, VOIFunction.SIGMOID), ("+Ww", "40", "400", "+Wfs")),
    ("CT_small.dcm", WindowSpec.from_preset("brain"), ("+Ww", "40", "80")),
    ("MR2_UNCR.dcm", WindowSpec.explicit(500, 700), ("+Ww", "500", "700")),
    ("RG1_UNCR.dcm", WindowSpec.explicit(10000, 5000), ("+Ww", "10000", "5000")),
    ("mlut_18.dcm", WindowSpec.explicit(0, 1000), ("+Ww", "0", "1000")),
    ("emri_small.dcm", WindowSpec.explicit(500, 700), ("+Ww", "500", "700")),
    ("eCT_Supplemental.dcm", WindowSpec.explicit(49, 102), ("+Ww", "49", "102")),
    ("vlut_04.dcm", WindowSpec.dataset(), ("+Wl", "1")),
]


@pytest.mark.parametrize(("name", "spec", "options"), EXPLICIT, ids=[f"{n}:{' '.join(o)}" for n, _, o in EXPLICIT])
def test_explicit_windows_match_dcmj2pnm(name: str, spec: WindowSpec, options: tuple[str, ...], tmp_path: Path) -> None:
    from tests.conftest import testdata

    path = testdata(name)
    ref = dcmtk(path, tmp_path, *options)
    assert ref is not None
    assert_close(ours(path, spec), ref)


#: Uncompressed colour: RGB, PALETTE COLOR (8 and 16 bit entries), YBR_FULL_422, big endian.
COLOUR = [
    "US1_UNCR.dcm",
    "OBXXXX1A.dcm",
    "OBXXXX1A_rle.dcm",
    "SC_rgb.dcm",
    "SC_rgb_16bit.dcm",
    "color-pl.dcm",
    "color-px.dcm",
    "examples_palette.dcm",
    "examples_rgb_color.dcm",
    "ExplVR_BigEnd.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "OT-PAL-8-face.dcm",
]


@pytest.mark.parametrize("name", COLOUR)
def test_colour_matches_dcmj2pnm(name: str, tmp_path: Path) -> None:
    from tests.conftest import testdata

    path = testdata(name)
    ref = dcmtk(path, tmp_path)
    assert ref is not None
    got = ours(path)
    assert got.ndim == 3 and got.shape[-1] == 3
    assert_close(got, ref)

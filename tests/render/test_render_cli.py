"""``preread render``: files and folders to PNGs, in parallel, with bad inputs listed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from preread.cli.render import render
from tests.conftest import testdata

app = typer.Typer()
app.command()(render)
# A second command makes typer keep "render" as an explicit subcommand name.
app.command("noop")(lambda: None)


def _inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm", "emri_small_RLE.dcm", "OBXXXX1A.dcm"):
        shutil.copy(testdata(name), folder / name)
    shutil.copy(testdata("MR_truncated.dcm"), folder / "sub" / "MR_truncated.dcm")
    (folder / "sub" / "notes.txt").write_text("not an image")
    return folder


def test_render_folder_lists_bad_inputs(tmp_path: Path) -> None:
    folder, out = _inputs(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(app, ["render", str(folder), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    pngs = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert pngs == ["CT_small.png", "MR_small.png", "OBXXXX1A.png"] + [f"emri_small_RLE_f{i:04d}.png" for i in range(1, 11)]
    assert "2 input(s) skipped" in result.output
    assert "MR_truncated.dcm" in result.output and "notes.txt" in result.output
    assert Image.open(out / "MR_small.png").size == (64, 64)  # full resolution by default
    assert Image.open(out / "OBXXXX1A.png").mode == "RGB"


def test_render_options(tmp_path: Path) -> None:
    src = testdata("CT_small.dcm")
    runner = CliRunner()
    res = runner.invoke(app, ["render", str(src), "--out", str(tmp_path / "a"), "--preset", "lung", "--workers", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["render", str(src), "--out", str(tmp_path / "b"), "--window", "-600/1500", "--workers", "1"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a/CT_small.png")), np.asarray(Image.open(tmp_path / "b/CT_small.png")))
    res = runner.invoke(
        app, ["render", str(src), "--out", str(tmp_path / "c"), "--rgb-windows", "brain,subdural,40/400", "--max-pixels", "50000"]
    )
    assert res.exit_code == 0, res.output
    png = Image.open(tmp_path / "c/CT_small.png")
    assert png.mode == "RGB" and png.size[0] % 28 == 0 and png.size[0] * png.size[1] <= 50000


def test_render_bad_options_and_nothing_rendered(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["render", str(testdata("CT_small.dcm")), "--out", str(tmp_path), "--preset", "lung", "--window", "1/2"])
    assert res.exit_code != 0 and "at most one" in res.output
    res = runner.invoke(app, ["render", str(testdata("CT_small.dcm")), "--out", str(tmp_path), "--preset", "nope"])
    assert res.exit_code != 0 and "unknown window preset" in res.output
    res = runner.invoke(app, ["render", str(testdata("reportsi.dcm")), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "no pixel data" in res.output


def test_window_needs_center_and_width_and_names_the_presets(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["render", str(testdata("CT_small.dcm")), "--out", str(tmp_path), "--window", "40"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "CENTER/WIDTH" in text and "40/400" in text and "unknown window preset" not in text
    assert "mediastinum" in text and "lung" in text, "the presets are named"
    res = runner.invoke(app, ["render", str(testdata("CT_small.dcm")), "--out", str(tmp_path / "ok"), "--window", "40/400"])
    assert res.exit_code == 0, res.output


def test_text_file_is_not_dicom(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("a text file\n")
    res = CliRunner().invoke(app, ["render", str(notes), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "notes.txt: not DICOM" in " ".join(res.output.split())
    assert "force" not in res.output and "no pixel data" not in res.output


def test_registered_in_preread_cli() -> None:
    from preread.cli.main import app as preread

    names = {c.name for c in preread.registered_commands}
    assert "render" in names

"""bench/render.py runs end to end on a tiny series (the real run is 500 x 512²)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="dcmtk dcmj2pnm not installed")
def test_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "render.py"), "--slices", "6", "--size", "64", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| dcmj2pnm (1 process/file) | 1 |" in proc.stdout
    assert "max |preread - dcmj2pnm| = 0" in proc.stdout or "max |preread - dcmj2pnm| = 1" in proc.stdout
    assert len(list((tmp_path / "preread2").glob("*.png"))) == 6

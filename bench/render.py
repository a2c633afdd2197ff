"""Rendering benchmark: preread vs dcmtk's dcmj2pnm on a 200 x 512² CT, window 40/400.

    .venv/bin/python bench/render.py [--slices 200] [--size 512] [--workdir DIR]

Generates the series once (a real 512² CT slice from pydicom-data, 693_UNCR,
with per-slice noise and positions), then in the same run times:

* dcmj2pnm, one process per file (it takes one file at a time), on one core;
* the ``preread render`` command, process start included, on the same core
  (the goal of issue 10 item 8: at least 8x faster than dcmj2pnm), and on 2 cores;
* preread (``ingest.render.batch``, in-process) on the same core;
* preread with 2 worker processes on 2 cores.

Each run writes all the PNGs (8-bit, full resolution). "One core" is enforced
with ``sched_setaffinity`` (children inherit it). The three measurements are
repeated ``--repeat`` times, interleaved, and the best time of each is kept
(other work on a shared machine only ever adds time). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preread.ingest.render.batch import jobs_for, render_files  # noqa: E402
from preread.ingest.render.windows import WindowSpec  # noqa: E402


def make_series(folder: Path, slices: int, size: int) -> list[Path]:
    """``slices`` CT files of ``size``² built from a real CT slice, each with its own noise and position."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    base = template.pixel_array.astype(np.int32)
    if base.shape != (size, size):
        from PIL import Image

        base = np.asarray(Image.fromarray(base.astype(np.float32)).resize((size, size))).astype(np.int32)
    rng = np.random.default_rng(0)
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(slices):
        ds = template.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-125.0, -125.0, float(i) * 0.625]
        ds.Rows = ds.Columns = size
        arr = np.clip(base + rng.normal(0, 8, base.shape).astype(np.int32), -2000, 4000).astype(np.int16)
        ds.PixelData = arr.tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def run_dcmj2pnm(paths: list[Path], out: Path) -> float:
    """Seconds for dcmj2pnm +Ww 40 400, one process per file, sequentially."""
    exe = shutil.which("dcmj2pnm")
    if exe is None:
        raise SystemExit("dcmj2pnm (dcmtk) is not installed")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for p in paths:
        subprocess.run([exe, "+Ww", "40", "400", "-O", "+on", str(p), str(out / f"{p.stem}.png")], check=True)
    return time.perf_counter() - start


def run_preread(folder: Path, out: Path, workers: int) -> float:
    """Seconds for preread to render every file of ``folder`` with window 40/400."""
    jobs = jobs_for([folder], out, WindowSpec.explicit(40, 400))
    start = time.perf_counter()
    results = render_files(jobs, workers=workers)
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.error]
    if bad:
        raise SystemExit(f"preread failed on {len(bad)} files: {bad[0].error}")
    return elapsed


def run_preread_cli(folder: Path, out: Path, workers: int) -> float:
    """Seconds for the ``preread render`` command (a new process, imports included) with ``workers`` processes."""
    script = Path(sys.executable).with_name("preread")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "preread.cli.main"]
    argv += ["render", str(folder), "--out", str(out), "--window", "40/400", "--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def max_difference(a_dir: Path, b_dir: Path, names: list[str]) -> int:
    """Largest per-pixel difference between two renderings of the same files."""
    from PIL import Image

    worst = 0
    for name in names:
        a = np.asarray(Image.open(a_dir / name)).astype(int)
        b = np.asarray(Image.open(b_dir / name)).astype(int)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep inputs and outputs here (default: a temp dir).")
    parser.add_argument("--repeat", type=int, default=3, help="Interleaved repetitions; the best time of each is kept.")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="preread-bench-"))
    series = work / "series"
    paths = sorted(series.glob("*.dcm")) if series.exists() else []
    if len(paths) != args.slices:
        shutil.rmtree(series, ignore_errors=True)
        t = time.perf_counter()
        paths = make_series(series, args.slices, args.size)
        print(f"generated {len(paths)} x {args.size}² CT in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    all_cpus = os.sched_getaffinity(0)
    one = {min(all_cpus)}
    cores = min(2, len(all_cpus))
    for p in paths:  # warm the page cache so neither side pays first-touch costs
        p.read_bytes()
    times: dict[str, list[float]] = {"dcmtk": [], "cli": [], "cli2": [], "one": [], "two": []}
    for _ in range(max(1, args.repeat)):
        for sub in ("dcmtk", "cli", "cli2", "preread1", "preread2"):
            shutil.rmtree(work / sub, ignore_errors=True)
        os.sched_setaffinity(0, one)
        times["dcmtk"].append(run_dcmj2pnm(paths, work / "dcmtk"))
        times["cli"].append(run_preread_cli(series, work / "cli", workers=1))
        times["one"].append(run_preread(series, work / "preread1", workers=1))
        os.sched_setaffinity(0, all_cpus)
        times["two"].append(run_preread(series, work / "preread2", workers=cores))
        times["cli2"].append(run_preread_cli(series, work / "cli2", workers=cores))
    t_dcmtk, t_cli, t_cli2 = min(times["dcmtk"]), min(times["cli"]), min(times["cli2"])
    t_one, t_two = min(times["one"]), min(times["two"])

    names = [f"{p.stem}.png" for p in paths[:: max(1, len(paths) // 20)]]
    diff = max_difference(work / "dcmtk", work / "cli", names)
    n = len(paths)
    rows = [
        ("dcmj2pnm (1 process/file)", 1, t_dcmtk),
        ("`preread render` command (process start included)", 1, t_cli),
        ("`preread render` command (process start included)", cores, t_cli2),
        ("preread in-process (no start-up)", 1, t_one),
        ("preread in-process (no start-up)", cores, t_two),
    ]
    print(
        f"\n{n} x {args.size}² CT, window 40/400, 8-bit PNG, best of {max(1, args.repeat)}; "
        f"max |preread - dcmj2pnm| = {diff} (sampled {len(names)} slices)\n"
    )
    print("| renderer | cores | seconds | images/s | vs dcmj2pnm (1 core) |")
    print("|---|---:|---:|---:|---:|")
    for name, c, secs in rows:
        print(f"| {name} | {c} | {secs:.2f} | {n / secs:.1f} | {t_dcmtk / secs:.1f}x |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

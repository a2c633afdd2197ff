"""Render many files, every frame, in parallel processes (the ``preread render`` job)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from preread.ingest.render.errors import UnreadableInstance
from preread.ingest.render.files import expand_inputs, write_png
from preread.ingest.render.pixels import ImagePixel, iter_frames, read_instance, render_stored
from preread.ingest.render.resize import fit
from preread.ingest.render.windows import WindowSpec

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}


@dataclass(frozen=True, slots=True)
class RenderJob:
    """One input file and where its PNGs go."""

    path: Path
    relative: Path
    out_dir: Path
    window: WindowSpec
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass(frozen=True, slots=True)
class FileResult:
    """The PNGs written for one file, or why none were."""

    path: Path
    outputs: tuple[Path, ...] = ()
    error: str | None = None


def output_stem(relative: Path) -> Path:
    """``relative`` without a DICOM suffix (names like UIDs keep their dots)."""
    if relative.suffix.lower() in _DICOM_SUFFIXES:
        return relative.with_suffix("")
    return relative


def render_file(job: RenderJob) -> FileResult:
    """Render every frame of one file; one PNG per frame (``_f0001`` suffixes when multi-frame).

    pydicom's warnings about odd encodings are silenced: a batch reports
    files that fail, not every tolerated quirk.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _render_file(job)


def _render_file(job: RenderJob) -> FileResult:
    try:
        ds = read_instance(job.path)
        info = ImagePixel.of(ds)
        stem = output_stem(job.relative)
        outputs = []
        for frame, stored in iter_frames(ds, info=info):
            rendered = render_stored(stored, ds, frame, job.window, info)
            pixels = fit(rendered.pixels, job.min_pixels, job.max_pixels)
            name = f"{stem.name}.png" if info.number_of_frames == 1 else f"{stem.name}_f{frame + 1:04d}.png"
            target = job.out_dir / stem.parent / name
            write_png(target, pixels, atomic=False)
            outputs.append(target)
        return FileResult(job.path, tuple(outputs))
    except UnreadableInstance as exc:
        return FileResult(job.path, error=str(exc))
    except Exception as exc:  # one odd file must not end a batch
        return FileResult(job.path, error=f"{type(exc).__name__}: {str(exc)[:200]}")


def jobs_for(
    inputs: Iterable[Path], out_dir: Path, window: WindowSpec, min_pixels: int | None = None, max_pixels: int | None = None
) -> list[RenderJob]:
    """A job per file found under ``inputs``."""
    return [RenderJob(p, rel, Path(out_dir), window, min_pixels, max_pixels) for p, rel in expand_inputs(inputs)]


def render_files(
    jobs: list[RenderJob], workers: int | None = None, on_result: Callable[[FileResult], None] | None = None
) -> list[FileResult]:
    """Run ``jobs``: in this process when ``workers`` is 1, else in a process pool.

    ``on_result`` is called in the parent as each file completes (for progress).
    """
    workers = workers or os.cpu_count() or 1
    results: list[FileResult] = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            result = render_file(job)
            results.append(result)
            if on_result:
                on_result(result)
        return results
    chunk = max(1, min(16, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(render_file, jobs, chunksize=chunk):
            results.append(result)
            if on_result:
                on_result(result)
    return results

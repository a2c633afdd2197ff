"""``preread render``: DICOM files or folders to windowed PNGs, one per frame."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from preread.ingest.render.batch import FileResult
    from preread.ingest.render.windows import WindowSpec


def window_spec(window: str | None, preset_name: str | None, rgb_windows: str | None, percentile: bool = False) -> WindowSpec:
    """The :class:`WindowSpec` for the mutually exclusive window options."""
    from preread.ingest.render.windows import WindowSpec, parse_window

    given = [o for o in (window, preset_name, rgb_windows) if o] + (["percentile"] if percentile else [])
    if len(given) > 1:
        raise typer.BadParameter("give at most one of --window, --preset, --rgb-windows, --percentile")
    try:
        if window:
            w = parse_window(window)
            if w.name.startswith("preset:"):
                return WindowSpec.from_preset(window)
            return WindowSpec.explicit(w.center, w.width)
        if preset_name:
            return WindowSpec.from_preset(preset_name)
        if rgb_windows:
            return WindowSpec.rgb([p.strip() for p in rgb_windows.split(",")])
    except (KeyError, ValueError) as exc:
        raise typer.BadParameter(str(exc).strip("'\"")) from None
    return WindowSpec.percentile() if percentile else WindowSpec.dataset()


def render(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs (mirrors the input folders).")],
    window: Annotated[
        str | None, typer.Option("--window", help="CENTER/WIDTH, e.g. 40/400 or -600/1500, or a preset name.")
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Named window, e.g. brain, lung, bone (an unknown name lists them all).")
    ] = None,
    rgb_windows: Annotated[
        str | None, typer.Option("--rgb-windows", help="Three windows (presets or C/W) packed as R,G,B, e.g. brain,subdural,bone.")
    ] = None,
    percentile: Annotated[bool, typer.Option("--percentile", help="Window each frame on its 0.5-99.5 percentiles.")] = False,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="Fit each PNG into this many pixels (sides multiples of 28).")] = None,
    min_pixels: Annotated[int | None, typer.Option("--min-pixels", help="Smallest area when fitting (with --max-pixels).")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Processes; default one per CPU.")] = 0,
) -> None:
    """Render DICOM files to 8-bit PNGs, one per frame, at full resolution unless --max-pixels.

    Default window: the dataset's first (else its VOI LUT, else percentiles).
    Unreadable inputs are listed with their reason and skipped; the exit code is
    1 when nothing could be rendered.
    """
    from rich.console import Console

    from preread.ingest.render.batch import jobs_for, render_files

    spec = window_spec(window, preset, rgb_windows, percentile)
    console = Console(stderr=True)
    # Files that fail are listed below; pydicom's notes on tolerated quirks are noise here.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    jobs = jobs_for(paths, out, spec, min_pixels if max_pixels or min_pixels else None, max_pixels)
    if not jobs:
        console.print("[red]no input files[/red]")
        raise typer.Exit(1)
    n_workers = workers or os.cpu_count() or 1
    failures: list[FileResult] = []
    written = 0

    def done(result: FileResult) -> None:
        nonlocal written
        written += len(result.outputs)
        if result.error:
            failures.append(result)

    if console.is_terminal:  # a progress bar only for a person watching (rich.progress costs startup time)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]render[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        with progress:
            task = progress.add_task("render", total=len(jobs))

            def done_and_shown(result: FileResult) -> None:
                done(result)
                progress.advance(task)

            render_files(jobs, workers=n_workers, on_result=done_and_shown)
    else:
        render_files(jobs, workers=n_workers, on_result=done)
    if failures:
        console.print(f"[yellow]{len(failures)} input(s) skipped:[/yellow]")
        for f in failures:
            console.print(f"  {f.path}: {f.error}", soft_wrap=True, markup=False, highlight=False)
    console.print(f"{written} PNG(s) from {len(jobs) - len(failures)} of {len(jobs)} file(s) in {out}")
    if len(failures) == len(jobs):
        raise typer.Exit(1)

"""Render one study: select frames, render them into the budget, write PNGs and manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from preread.ingest.render.errors import RenderError, UnreadableInstance
from preread.ingest.render.files import write_png
from preread.ingest.render.manifest import MANIFEST_NAME, RenderedImage, StudyRendering, read_manifest, write_manifest
from preread.ingest.render.pixels import RenderedFrame, read_instance, render_frame
from preread.ingest.render.resize import fit
from preread.ingest.render.selection import (
    FrameRef,
    InstanceHeader,
    SelectionPolicy,
    candidates,
    read_header,
    reading_order,
    select_frames,
)
from preread.ingest.render.windows import WindowSpec


def _png_name(ordinal: int, ref: FrameRef) -> str:
    return f"{ordinal:03d}_{ref.sop_instance_uid}_f{ref.frame + 1:04d}.png"


def _remove_stale(out_dir: Path, keep: set[Path]) -> None:
    """Delete PNGs listed by a previous manifest in ``out_dir`` that this one does not list."""
    manifest = out_dir / MANIFEST_NAME
    if not manifest.exists():
        return
    try:
        old = read_manifest(manifest)
    except Exception:
        return
    for image in old.images:
        if image.path not in keep and image.path.parent == out_dir:
            image.path.unlink(missing_ok=True)


def render_study(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    max_images: int,
    min_pixels: int | None,
    max_pixels: int | None,
    window: WindowSpec | None = None,
    policy: SelectionPolicy = SelectionPolicy(),
) -> StudyRendering:
    """Render the frames of one study a 2D model should see.

    ``paths`` are the study's files (any series). Selection follows
    :mod:`ingest.render.selection`; each chosen frame is windowed (``window``,
    default the dataset's first), fitted into ``min_pixels``..``max_pixels``
    and written as a PNG in ``out_dir`` with ``manifest.json``. A bad file
    goes to ``errors``; :class:`RenderError` only when nothing renders.
    """
    spec = window or WindowSpec.dataset()
    out_dir = Path(out_dir)
    errors: list[tuple[Path, str]] = []
    headers: list[InstanceHeader] = []
    for path in paths:
        try:
            headers.append(read_header(path))
        except UnreadableInstance as exc:
            errors.append((Path(path), str(exc)))
    keep, skipped = candidates(headers, policy)
    study_uid = None
    done: list[tuple[FrameRef, RenderedFrame, np.ndarray]] = []
    # Frames that fail are replaced by the next candidates, up to max_images.
    remaining = list(keep)
    datasets: dict[Path, Dataset] = {}
    while remaining and len(done) < max_images:
        include = policy.include | frozenset(h.kind for h in remaining)  # keep a fallback chosen the first time
        refs = select_frames(remaining, max_images - len(done), SelectionPolicy(include=include))
        if not refs:
            break
        failed: set[Path] = set()
        for ref in refs:
            path = ref.header.path
            try:
                ds = datasets.get(path)
                if ds is None:
                    ds = datasets[path] = read_instance(path)
                    study_uid = study_uid or (str(ds.get("StudyInstanceUID") or "") or None)
                rendered = render_frame(ds, ref.frame, spec)
            except UnreadableInstance as exc:
                errors.append((path, str(exc)))
                failed.add(path)
                continue
            done.append((ref, rendered, fit(rendered.pixels, min_pixels, max_pixels)))
        if not failed:
            break
        taken = {(r.header.path, r.frame) for r, _, _ in done}
        remaining = [
            h for h in remaining if h.path not in failed and not all((h.path, f) in taken for f in range(h.number_of_frames))
        ]
    done.sort(key=lambda item: reading_order(item[0]))
    images: list[RenderedImage] = []
    for ordinal, (ref, rendered, pixels) in enumerate(done):
        png = out_dir / _png_name(ordinal, ref)
        write_png(png, pixels)
        images.append(
            RenderedImage(
                sop_instance_uid=ref.sop_instance_uid,
                series_instance_uid=ref.series_instance_uid,
                frame=ref.frame,
                ordinal=ordinal,
                path=png,
                window=rendered.window,
                window_center=rendered.window_center,
                window_width=rendered.window_width,
                width=int(pixels.shape[1]),
                height=int(pixels.shape[0]),
                modality=ref.header.modality,
                slice_position=ref.position,
            )
        )
    if not images:
        reasons = "; ".join(sorted({r for _, r in errors})) or "no image instances"
        raise RenderError(f"nothing in the study could be rendered ({len(paths)} files: {reasons[:300]})")
    _remove_stale(out_dir, {i.path for i in images})
    rendering = StudyRendering(
        images=images,
        errors=errors,
        manifest_path=out_dir / MANIFEST_NAME,
        skipped=[(h.path, kind) for h, kind in skipped],
        study_instance_uid=study_uid,
        window=spec.name,
    )
    write_manifest(rendering, min_pixels=min_pixels, max_pixels=max_pixels)
    return rendering

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
    VOLUME_MODALITIES,
    InstanceHeader,
    Kind,
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
    not_shown = what_was_not_shown(headers, skipped, errors, images, max_images)
    rendering = StudyRendering(
        images=images,
        errors=errors,
        manifest_path=out_dir / MANIFEST_NAME,
        skipped=[(h.path, kind) for h, kind in skipped],
        study_instance_uid=study_uid,
        window=spec.name,
        not_shown=not_shown,
    )
    write_manifest(rendering, min_pixels=min_pixels, max_pixels=max_pixels)
    return rendering


#: What an instance left out by its kind is, in the manifest's words.
KIND_REASONS = {
    Kind.LOCALIZER: "localizer",
    Kind.DOSE_REPORT: "dose report",
    Kind.SR: "structured report",
    Kind.PR: "presentation state",
    Kind.KO: "key object selection",
    Kind.SCREEN_CAPTURE: "screen capture",
    Kind.NON_IMAGE: "not an image",
}


def _majority(headers: list[InstanceHeader], attribute: str) -> bool:
    return sum(bool(getattr(h, attribute)) for h in headers) * 2 >= len(headers)


def _series_reason(series: list[InstanceHeader], shown: list[list[InstanceHeader]]) -> str:
    """Why a series of candidate images was not shown, measured against the series that were."""
    if not shown:
        return "nothing of the study could be shown"
    main = max(shown, key=lambda s: sum(h.number_of_frames for h in s))
    modality, main_modality = series[0].modality, main[0].modality
    frames = sum(h.number_of_frames for h in series)
    main_frames = sum(h.number_of_frames for h in main)
    if modality not in VOLUME_MODALITIES and main_modality in VOLUME_MODALITIES:
        return f"not a CT/MR volume: the {main_modality} series was chosen"
    if _majority(main, "is_primary") and not _majority(series, "is_primary"):
        return "secondary (derived or reformatted) series: a primary series was chosen"
    if _majority(main, "is_axial") and not _majority(series, "is_axial"):
        return "not axial: an axial series was chosen"
    if frames < main_frames:
        return f"fewer slices than the chosen series ({frames} < {main_frames})"
    if modality != main_modality:
        return f"{modality}: the {main_modality} series was chosen"
    return f"one series is shown: the chosen series has as many slices ({main_frames}) and comes first"


def what_was_not_shown(
    headers: list[InstanceHeader],
    skipped: list[tuple[InstanceHeader, str]],
    errors: list[tuple[Path, str]],
    images: list[RenderedImage],
    max_images: int,
) -> dict[str, list[dict[str, object]]]:
    """Every series and instance of the study the model does not see, each with its reason.

    Instances: left out by kind (localizer, dose report ...), unreadable, in a series that was not
    chosen, or in the chosen series but beyond the image limit (``max_images`` frames, evenly spaced).
    Series: those with no image shown, with the reason they lost to the chosen one.
    """
    shown_uids = {i.sop_instance_uid for i in images}
    shown_series = {i.series_instance_uid for i in images}
    kinds = {id(h): kind for h, kind in skipped}
    failed = {Path(p): reason for p, reason in errors}
    by_series: dict[str, list[InstanceHeader]] = {}
    for h in headers:
        by_series.setdefault(h.series_instance_uid, []).append(h)
    shown_groups = [group for uid, group in by_series.items() if uid in shown_series]
    series_out: list[dict[str, object]] = []
    series_reason: dict[str, str] = {}
    for uid, group in by_series.items():
        if uid in shown_series:
            continue
        group_kinds = {kinds.get(id(h)) for h in group}
        if None not in group_kinds:  # every instance left out by its kind
            reason = ", ".join(sorted(KIND_REASONS.get(k, str(k)) for k in group_kinds if k))
        elif all(h.path in failed for h in group if id(h) not in kinds):
            reason = "unreadable"
        else:
            reason = _series_reason([h for h in group if id(h) not in kinds], shown_groups)
        series_reason[uid] = reason
        series_out.append({
            "series_instance_uid": uid,
            "modality": group[0].modality,
            "series_number": group[0].series_number,
            "instances": len(group),
            "frames": sum(h.number_of_frames for h in group),
            "reason": reason,
        })
    shown_total = sum(h.number_of_frames for group in shown_groups for h in group if id(h) not in kinds)
    instances_out: list[dict[str, object]] = []
    for h in headers:
        if h.sop_instance_uid in shown_uids:
            continue
        if id(h) in kinds:
            reason = KIND_REASONS.get(kinds[id(h)], kinds[id(h)])
        elif h.path in failed:
            reason = f"unreadable: {failed[h.path]}"
        elif h.series_instance_uid in series_reason:
            reason = f"series not shown: {series_reason[h.series_instance_uid]}"
        else:
            reason = (
                f"over the image limit: {len(images)} of {shown_total} frames shown, evenly spaced "
                f"(PREREAD_MAX_IMAGES={max_images})"
            )
        instances_out.append({
            "file": str(h.path),
            "sop_instance_uid": h.sop_instance_uid,
            "series_instance_uid": h.series_instance_uid,
            "reason": reason,
        })
    read = {h.path for h in headers}
    for path, reason in errors:  # files whose header could not even be read
        if path not in read:
            instances_out.append({"file": str(path), "sop_instance_uid": None, "series_instance_uid": None,
                                  "reason": f"unreadable: {reason}"})
    return {"series": series_out, "instances": instances_out}

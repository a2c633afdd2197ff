"""The per-study manifest: which PNG shows which SOP instance, frame and window.

Written as ``manifest.json`` next to the PNGs and stored as ``images`` rows;
the worker and the API read either.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preread.ingest.render.files import write_json

if TYPE_CHECKING:  # the database half is imported by store_images: rendering files needs no SQLAlchemy
    from sqlalchemy.orm import Session

MANIFEST_NAME = "manifest.json"
#: Additions keep the version (readers use defaults): ``not_shown`` came later, within version 1.
MANIFEST_VERSION = 1


@dataclass(frozen=True, slots=True)
class RenderedImage:
    """One PNG of one frame (``frame`` 0-based) and how it was made."""

    sop_instance_uid: str
    series_instance_uid: str
    frame: int
    ordinal: int
    path: Path
    window: str
    window_center: float | None
    window_width: float | None
    width: int
    height: int
    modality: str = ""
    #: Position along the slice normal (mm), where known.
    slice_position: float | None = None

    def to_json(self, base: Path) -> dict[str, Any]:
        """A manifest entry; ``file`` is relative to the manifest's folder."""
        out = asdict(self)
        out.pop("path")
        try:
            out["file"] = str(self.path.relative_to(base))
        except ValueError:
            out["file"] = str(self.path)
        return out

    @classmethod
    def from_json(cls, entry: dict[str, Any], base: Path) -> RenderedImage:
        """Inverse of :meth:`to_json`."""
        data = dict(entry)
        data["path"] = base / data.pop("file")
        return cls(**data)


@dataclass(slots=True)
class StudyRendering:
    """What :func:`render_study` produced: images in order, errors, manifest file."""

    images: list[RenderedImage]
    errors: list[tuple[Path, str]]
    manifest_path: Path
    #: Instances left out by selection, with their kind (localizer, sr ...).
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    study_instance_uid: str | None = None
    window: str = "dataset"
    #: Everything the model does not see, with why: ``{"series": [...], "instances": [...]}``.
    not_shown: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def write_manifest(rendering: StudyRendering, *, min_pixels: int | None, max_pixels: int | None) -> Path:
    """Write ``rendering`` as ``manifest.json`` (atomically) and return its path."""
    base = rendering.manifest_path.parent
    payload = {
        "version": MANIFEST_VERSION,
        "study_instance_uid": rendering.study_instance_uid,
        "window": rendering.window,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "images": [image.to_json(base) for image in rendering.images],
        "errors": [{"file": str(p), "reason": r} for p, r in rendering.errors],
        "skipped": [{"file": str(p), "kind": k} for p, k in rendering.skipped],
        "not_shown": rendering.not_shown,
    }
    write_json(rendering.manifest_path, payload)
    return rendering.manifest_path


def read_manifest(path: Path) -> StudyRendering:
    """Load a manifest written by :func:`write_manifest` (``path``: the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    base = path.parent
    return StudyRendering(
        images=[RenderedImage.from_json(e, base) for e in data.get("images", [])],
        errors=[(Path(e["file"]), e["reason"]) for e in data.get("errors", [])],
        manifest_path=path,
        skipped=[(Path(e["file"]), e["kind"]) for e in data.get("skipped", [])],
        study_instance_uid=data.get("study_instance_uid"),
        window=data.get("window", "dataset"),
        not_shown=data.get("not_shown", {}),
    )


def store_images(session: Session, study_id: int, rendering: StudyRendering) -> None:
    """Replace the study's ``images`` rows with ``rendering``'s; the caller commits.

    ``instance_id`` is looked up by SOP Instance UID (``None`` if not indexed).
    """
    from sqlalchemy import delete, select

    from preread.schemas.tables import Image, Instance

    uids = sorted({image.sop_instance_uid for image in rendering.images})
    ids: dict[str, int] = {}
    if uids:
        rows = session.execute(select(Instance.id, Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids)))
        ids = {uid: id_ for id_, uid in rows}
    session.execute(delete(Image).where(Image.study_id == study_id))
    session.add_all(
        Image(
            study_id=study_id,
            instance_id=ids.get(image.sop_instance_uid),
            sop_instance_uid=image.sop_instance_uid,
            frame=image.frame,
            ordinal=image.ordinal,
            path=str(image.path),
            window=image.window[:64] if image.window else None,
            window_center=image.window_center,
            window_width=image.window_width,
            width=image.width,
            height=image.height,
        )
        for image in rendering.images
    )
    session.flush()

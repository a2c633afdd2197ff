"""Which frames of a study a 2D model should see.

1. Classify every instance from its header: localizers/scouts, dose reports,
   SR, PR, KO, screen captures and non-image objects are skipped unless the
   :class:`SelectionPolicy` asks for them.
2. CT and MR: the series worth reading is the primary axial one with the most
   slices. CR, DX, MG (and other projection radiography): every view. Anything
   else (US, NM, XA, OT ...): all remaining frames.
3. At most ``max_images`` frames, evenly spaced through the volume in the order
   of Image Position (Patient) along the slice normal (not Instance Number).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from preread.ingest.assembly.catalog import int_attribute
from preread.ingest.assembly.reading import has_pixel_data, read_file
from preread.ingest.render.errors import UnreadableInstance

VOLUME_MODALITIES = frozenset({"CT", "MR"})
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "DR"})
NON_IMAGE_MODALITIES = frozenset(
    {"SR", "PR", "KO", "DOC", "REG", "SEG", "RTDOSE", "RTPLAN", "RTSTRUCT", "RTRECORD", "ECG", "HD", "PLAN", "FID", "RWV", "AU"}
)
#: SOP Class UID prefixes: SR (incl. dose SR), PR, secondary capture, RT, waveforms, raw data, encapsulated docs.
_SR = "1.2.840.10008.5.1.4.1.1.88."
_KO = "1.2.840.10008.5.1.4.1.1.88.59"
_DOSE_SR = ("1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.68", "1.2.840.10008.5.1.4.1.1.88.74")
_PR = "1.2.840.10008.5.1.4.1.1.11."
_SC = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.")
_OTHER_NON_IMAGE = ("1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.9.", "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.66")

_LOCALIZER_TEXT = re.compile(
    r"\b(scout|scouts|locali[sz]er|loc|3[ -]?pl(ane)?[ _-]?loc|topo(gram)?|surview|scanogram|survey|pilot|tripilot)\b", re.I
)
#: Not bare "dose": "Low Dose CT Chest" is an ordinary series.
_DOSE_TEXT = re.compile(
    r"\b(dose ?(report|info|information|summary|record|sr)|radiation dose|patient protocol|exam protocol|rdsr)\b", re.I
)
_SCREEN_TEXT = re.compile(r"\b(screen ?(save|capture|shot)|capture)\b", re.I)


class Kind:
    """Why an instance is or is not a candidate (values of :attr:`InstanceHeader.kind`)."""

    IMAGE = "image"
    LOCALIZER = "localizer"
    DOSE_REPORT = "dose_report"
    SR = "sr"
    PR = "pr"
    KO = "ko"
    SCREEN_CAPTURE = "screen_capture"
    NON_IMAGE = "non_image"


@dataclass(frozen=True, slots=True)
class SelectionPolicy:
    """What to consider beyond ordinary images; ``include`` holds :class:`Kind` values."""

    include: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The header attributes selection needs, for one stored instance."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str
    image_type: tuple[str, ...]
    series_number: int | None
    instance_number: int | None
    series_description: str
    rows: int
    columns: int
    number_of_frames: int
    has_pixels: bool
    #: Image Orientation (Patient) (six direction cosines), classic or shared/per-frame group.
    orientation: tuple[float, ...] | None
    #: Image Position (Patient) per frame (``None`` where unknown).
    positions: tuple[tuple[float, float, float] | None, ...] = field(default=())

    @property
    def kind(self) -> str:
        """Classification of this instance (a :class:`Kind` value)."""
        uid, text = self.sop_class_uid, self.series_description
        if uid.startswith(_DOSE_SR) or (self.modality == "SR" and _DOSE_TEXT.search(text)):
            return Kind.DOSE_REPORT
        if uid == _KO or self.modality == "KO":
            return Kind.KO
        if uid.startswith(_SR) or self.modality == "SR":
            return Kind.SR
        if uid.startswith(_PR) or self.modality == "PR":
            return Kind.PR
        if _DOSE_TEXT.search(text):
            return Kind.DOSE_REPORT
        if uid.startswith(_OTHER_NON_IMAGE) or self.modality in NON_IMAGE_MODALITIES or not self.has_pixels:
            return Kind.NON_IMAGE
        types = {t.upper() for t in self.image_type}
        if "LOCALIZER" in types or _LOCALIZER_TEXT.search(text):
            return Kind.LOCALIZER
        if uid in _SC or uid.startswith(_SC[1]) or types & {"SCREEN SAVE", "SCREEN CAPTURE", "SCREENSHOT"} or _SCREEN_TEXT.search(text):
            return Kind.SCREEN_CAPTURE
        return Kind.IMAGE

    @property
    def is_primary(self) -> bool:
        """Image Type value 2 is PRIMARY (not a reformat or derived secondary)."""
        return len(self.image_type) > 1 and self.image_type[1].upper() == "PRIMARY"

    @property
    def normal(self) -> np.ndarray | None:
        """The slice normal (row x column direction cosines), if the orientation is known."""
        if not self.orientation or len(self.orientation) != 6:
            return None
        row, col = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        n = np.cross(row, col)
        norm = float(np.linalg.norm(n))
        return n / norm if norm > 1e-6 else None

    @property
    def is_axial(self) -> bool:
        """The slice normal is within ~37 degrees of the patient's head-foot axis."""
        n = self.normal
        return n is not None and abs(float(n[2])) > 0.8


@dataclass(frozen=True, slots=True)
class FrameRef:
    """One frame of one instance chosen for rendering; ``frame`` is 0-based."""

    header: InstanceHeader
    frame: int
    position: float | None = None

    @property
    def sop_instance_uid(self) -> str:
        return self.header.sop_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.header.series_instance_uid


def _str(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if not isinstance(value, Iterable):
        return None
    try:
        out = tuple(float(v) for v in value)
    except Exception:
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _point(value: object) -> tuple[float, float, float] | None:
    """An x, y, z position, or None when ``value`` is not three finite numbers."""
    out = _floats(value, 3)
    return None if out is None else (out[0], out[1], out[2])


def _group_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> object:
    """``keyword`` in ``sequence`` of the per-frame, else the shared functional group."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and index < len(seq):
            inner = seq[index].get(sequence)
            if inner and keyword in inner[0]:
                return inner[0][keyword].value
    return None


def header_of(ds: Dataset, path: Path) -> InstanceHeader:
    """The selection attributes of a read dataset."""
    frames = max(int_attribute(ds, "NumberOfFrames") or 1, 1)
    image_type = ds.get("ImageType") or ()
    image_type = (image_type,) if isinstance(image_type, str) else tuple(str(v) for v in image_type)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    positions: list[tuple[float, float, float] | None]
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        orientation = orientation or _floats(_group_value(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        positions = [
            _point(_group_value(ds, f, "PlanePositionSequence", "ImagePositionPatient")) for f in range(frames)
        ]
        if not image_type:
            ft = _group_value(ds, 0, "CTImageFrameTypeSequence", "FrameType") or _group_value(ds, 0, "MRImageFrameTypeSequence", "FrameType")
            if isinstance(ft, str):
                image_type = (ft,)
            elif isinstance(ft, Iterable):
                image_type = tuple(str(v) for v in ft)
    else:
        positions = [_point(ds.get("ImagePositionPatient"))] + [None] * (frames - 1)
    has_pixels = has_pixel_data(ds)
    return InstanceHeader(
        path=Path(path),
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        sop_class_uid=_str(ds, "SOPClassUID"),
        series_instance_uid=_str(ds, "SeriesInstanceUID"),
        modality=_str(ds, "Modality").upper(),
        image_type=image_type,
        series_number=int_attribute(ds, "SeriesNumber"),
        instance_number=int_attribute(ds, "InstanceNumber"),
        series_description=_str(ds, "SeriesDescription"),
        rows=int_attribute(ds, "Rows") or 0,
        columns=int_attribute(ds, "Columns") or 0,
        number_of_frames=frames,
        has_pixels=has_pixels,
        orientation=orientation,
        positions=tuple(positions),
    )


def read_header(path: Path | str) -> InstanceHeader:
    """Read the header of ``path`` (large values such as Pixel Data are deferred, not loaded)."""
    try:
        ds, cut_short = read_file(path, force=True, defer_size="64 KB")
    except FileNotFoundError:
        raise UnreadableInstance("file not found") from None
    except IsADirectoryError:
        raise UnreadableInstance("is a directory") from None
    except Exception as exc:
        raise UnreadableInstance(f"not a readable DICOM file ({type(exc).__name__})") from None
    if cut_short:
        raise UnreadableInstance("truncated file: it ends inside the pixel data")
    if "SOPInstanceUID" not in ds and "PixelData" not in ds:
        raise UnreadableInstance("not a DICOM file (no SOP Instance UID, no pixel data)")
    return header_of(ds, Path(path))


# --------------------------------------------------------------------------- choosing


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices out of ``range(n)``, the centres of ``k`` equal bins (all when k >= n)."""
    if k <= 0 or n <= 0:
        return []
    if k >= n:
        return list(range(n))
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


def _frames_of(headers: list[InstanceHeader]) -> list[FrameRef]:
    """Every frame of ``headers``, sorted along the slice normal when positions are known."""
    refs: list[FrameRef] = []
    normal = next((h.normal for h in headers if h.normal is not None), None)
    for h in headers:
        for f in range(h.number_of_frames):
            pos = h.positions[f] if f < len(h.positions) else None
            along = float(np.dot(normal, pos)) if normal is not None and pos is not None else None
            refs.append(FrameRef(h, f, along))
    if refs and all(r.position is not None for r in refs):
        refs.sort(key=lambda r: (r.position, r.header.instance_number or 0, r.frame))
    else:
        refs.sort(key=lambda r: (r.header.instance_number if r.header.instance_number is not None else 1 << 30, r.frame))
    return refs


def _by_series(headers: list[InstanceHeader]) -> dict[str, list[InstanceHeader]]:
    series: dict[str, list[InstanceHeader]] = {}
    for h in headers:
        series.setdefault(h.series_instance_uid, []).append(h)
    return series


def _series_order(headers: list[InstanceHeader]) -> tuple[int, str]:
    number = min((h.series_number for h in headers if h.series_number is not None), default=1 << 30)
    return number, headers[0].series_instance_uid


def _volume_score(headers: list[InstanceHeader]) -> tuple[int, int, int, int]:
    """Primary first, then axial, then most slices, then CT over MR."""
    n = sum(h.number_of_frames for h in headers)
    primary = sum(h.is_primary for h in headers) * 2 >= len(headers)
    axial = sum(h.is_axial for h in headers) * 2 >= len(headers)
    return int(primary), int(axial), n, int(headers[0].modality == "CT")


def candidates(headers: list[InstanceHeader], policy: SelectionPolicy = SelectionPolicy()) -> tuple[list[InstanceHeader], list[tuple[InstanceHeader, str]]]:
    """(instances worth considering, skipped instances with their kind).

    When nothing but skipped kinds with pixels is present (a study of only
    screen captures, say), those are considered rather than rendering nothing.
    """
    keep, skipped = [], []
    for h in headers:
        kind = h.kind
        if kind == Kind.IMAGE or (kind in policy.include and h.has_pixels):
            keep.append(h)
        else:
            skipped.append((h, kind))
    if not keep:
        fallback = [h for h, kind in skipped if kind in (Kind.SCREEN_CAPTURE, Kind.LOCALIZER) and h.has_pixels]
        if fallback:
            keep = fallback
            skipped = [(h, k) for h, k in skipped if h not in fallback]
    return keep, skipped


def choose_series(headers: list[InstanceHeader]) -> list[list[InstanceHeader]]:
    """The series to read, in reading order, from candidate instances."""
    series = _by_series(headers)
    volumes = [s for s in series.values() if s[0].modality in VOLUME_MODALITIES]
    if volumes:
        return [max(volumes, key=lambda s: (_volume_score(s), -_series_order(s)[0]))]
    projections = [s for s in series.values() if s[0].modality in PROJECTION_MODALITIES]
    chosen = projections or list(series.values())
    return sorted(chosen, key=_series_order)


def reading_order(ref: FrameRef) -> tuple[int, str, int, float, int, int]:
    """Sort key: series (by number), then position along the normal, else Instance Number, then frame."""
    h = ref.header
    series_number = h.series_number if h.series_number is not None else 1 << 30
    if ref.position is not None:
        return series_number, h.series_instance_uid, 0, ref.position, 0, ref.frame
    return series_number, h.series_instance_uid, 1, 0.0, h.instance_number or 0, ref.frame


def select_frames(headers: list[InstanceHeader], max_images: int, policy: SelectionPolicy = SelectionPolicy()) -> list[FrameRef]:
    """At most ``max_images`` frames of the study for a 2D model, in reading order."""
    keep, _ = candidates(headers, policy)
    if not keep or max_images <= 0:
        return []
    chosen = choose_series(keep)
    if len(chosen) == 1:
        frames = _frames_of(chosen[0])
    else:  # every view: series in order, each series' frames in order
        frames = [ref for s in chosen for ref in _frames_of(s)]
    return [frames[i] for i in evenly_spaced(len(frames), max_images)]

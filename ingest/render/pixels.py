"""From a stored frame to 8-bit display pixels.

Per frame: decode (pylibjpeg plugins via pydicom), Modality LUT (Rescale
Slope/Intercept or the Modality LUT Sequence, pydicom's ``apply_modality_lut``),
VOI (window per PS3.3 C.11.2.1.2, or the VOI LUT Sequence via pydicom's
``apply_voi_lut``), MONOCHROME1 inversion, and colour (PALETTE COLOR via
``apply_color_lut``; YBR_* decoded to RGB by pydicom) to 8 bits.

Grey frames with 8- or 16-bit integer storage go through one precomputed
lookup table (stored value -> output byte), cached per set of parameters:
a 500-slice series with one window computes it once and then costs one
gather per pixel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.dataset
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, iter_pixels, pixel_array

from preread.ingest.assembly.reading import read_file
from preread.ingest.render.errors import UnreadableInstance
from preread.ingest.render.windows import VOIFunction, VOIWindow, WindowMode, WindowSpec, percentile_window

#: Attributes of the Modality LUT and VOI LUT modules copied into a frame's view.
_LUT_KEYWORDS = (
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_PIXEL_KEYWORDS = ("PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation", "HighBit")
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}


@dataclass(frozen=True, slots=True)
class ImagePixel:
    """The Image Pixel module attributes that decide how a frame is rendered."""

    rows: int
    columns: int
    samples_per_pixel: int
    photometric_interpretation: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    number_of_frames: int

    @classmethod
    def of(cls, ds: Dataset) -> ImagePixel:
        """Read from ``ds``; raises :class:`UnreadableInstance` when the module is incomplete."""
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise UnreadableInstance("no pixel data")
        try:
            rows, columns = int(ds.Rows), int(ds.Columns)
            bits_allocated = int(ds.BitsAllocated)
        except (AttributeError, TypeError, ValueError):
            raise UnreadableInstance("incomplete Image Pixel module (Rows, Columns, Bits Allocated)") from None
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            frames = 1
        pi = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
        return cls(
            rows=rows,
            columns=columns,
            samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
            photometric_interpretation=pi,
            bits_allocated=bits_allocated,
            bits_stored=int(ds.get("BitsStored") or bits_allocated),
            pixel_representation=int(ds.get("PixelRepresentation") or 0),
            number_of_frames=max(frames, 1),
        )

    @property
    def is_monochrome(self) -> bool:
        """True for MONOCHROME1/2 (one sample, grey)."""
        return self.samples_per_pixel == 1 and self.photometric_interpretation != "PALETTE COLOR"


@dataclass(frozen=True, slots=True)
class FrameTransforms:
    """The Modality LUT and VOI LUT attributes that apply to one frame.

    ``view`` is a small dataset holding them (top level, then the shared and
    per-frame functional groups of an enhanced multi-frame), in the form
    pydicom's LUT functions read.
    """

    view: Dataset
    windows: tuple[VOIWindow, ...]
    has_voi_lut: bool

    @property
    def modality_key(self) -> tuple[object, ...]:
        """Hashable identity of the modality transform, for LUT caching."""
        v = self.view
        if "ModalityLUTSequence" in v:
            item = v.ModalityLUTSequence[0]
            return ("mlut", tuple(item.LUTDescriptor), hash(bytes(np.asarray(item.LUTData, dtype=np.int64))))
        slope = v.get("RescaleSlope")
        intercept = v.get("RescaleIntercept")
        if slope is None or intercept is None:
            return ("identity",)
        return ("rescale", float(slope), float(intercept))


def read_instance(path: Path | str) -> Dataset:
    """Read one file in full (header and pixel data, once).

    Raises :class:`UnreadableInstance` with a PHI-free reason.
    """
    try:
        ds, cut_short = read_file(path, force=True)
    except FileNotFoundError:
        raise UnreadableInstance("file not found") from None
    except IsADirectoryError:
        raise UnreadableInstance("is a directory") from None
    except Exception as exc:  # pydicom raises many types on malformed input
        if not _has_dicm_prefix(path):
            raise UnreadableInstance(NOT_DICOM) from None
        raise UnreadableInstance(f"not a readable DICOM file ({type(exc).__name__}: {_short(exc)})") from None
    if not any(k in ds for k in _IDENTIFYING_KEYWORDS) and not _has_dicm_prefix(path):
        raise UnreadableInstance(NOT_DICOM)  # read "by force", a text file is an empty data set
    if cut_short:
        raise UnreadableInstance("truncated file: it ends inside the pixel data")
    _guess_transfer_syntax(ds)
    return ds


#: The reason given for files that are not DICOM at all (pydicom's "use force=True" is no advice to a user).
NOT_DICOM = "not DICOM (no DICM prefix and no DICOM attributes)"
#: Attributes any DICOM image or object has; a file without the prefix and without all of them is not DICOM.
_IDENTIFYING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "Rows", "PixelData")
#: Where Part 10 puts the "DICM" prefix: after the 128-byte preamble.
_PREFIX_AT = 128


def _has_dicm_prefix(path: Path | str) -> bool:
    """Whether the file has the Part 10 "DICM" prefix (files without it may still be raw DICOM data sets)."""
    try:
        with open(path, "rb") as f:
            f.seek(_PREFIX_AT)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _guess_transfer_syntax(ds: Dataset) -> None:
    """Give a file without File Meta Information the transfer syntax it was read with."""
    meta = ds.get("file_meta")
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def _functional_items(ds: Dataset, frame: int) -> list[Dataset]:
    """The shared then the per-frame functional group items of ``frame`` (either may be absent)."""
    items = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        items.append(per_frame[frame])
    return items


def frame_transforms(ds: Dataset, frame: int = 0) -> FrameTransforms:
    """The Modality LUT and VOI attributes of ``frame`` (0-based), functional groups included.

    A dataset without functional groups is its own view (no copy: this runs per frame).
    """
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return FrameTransforms(view=ds, windows=_windows_of(ds), has_voi_lut=bool(ds.get("VOILUTSequence")))
    view = Dataset()
    for kw in _PIXEL_KEYWORDS + _LUT_KEYWORDS:
        if kw in ds and ds[kw].value not in (None, ""):
            setattr(view, kw, ds[kw].value)
    for item in _functional_items(ds, frame):
        for seq_kw in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            seq = item.get(seq_kw)
            if not seq:
                continue
            for kw in _LUT_KEYWORDS:
                if kw in seq[0] and seq[0][kw].value not in (None, ""):
                    setattr(view, kw, seq[0][kw].value)
    return FrameTransforms(view=view, windows=_windows_of(view), has_voi_lut=bool(view.get("VOILUTSequence")))


def _as_list(value: Any) -> list[float]:
    """A DICOM number or multi-value (pydicom's values are untyped) as floats."""
    if value is None or value == "":
        return []
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [float(v) for v in value]
    return [float(value)]


def _windows_of(view: Dataset) -> tuple[VOIWindow, ...]:
    try:
        centers = _as_list(view.get("WindowCenter"))
        widths = _as_list(view.get("WindowWidth"))
    except (TypeError, ValueError):
        return ()
    raw = str(view.get("VOILUTFunction") or "LINEAR").strip().upper()
    try:
        function = VOIFunction(raw)
    except ValueError:
        function = VOIFunction.LINEAR
    out = []
    for c, w in zip(centers, widths):
        limit = 1.0 if function is VOIFunction.LINEAR else 0.0
        if np.isfinite(c) and np.isfinite(w) and (w >= limit if function is VOIFunction.LINEAR else w > limit):
            out.append(VOIWindow(c, w, function, "dataset"))
    return tuple(out)


# --------------------------------------------------------------------------- decoding


def decode_frame(ds: Dataset, frame: int = 0) -> np.ndarray:
    """The stored values of one frame (YBR converted to RGB by pydicom)."""
    try:
        return pixel_array(ds, index=frame)
    except Exception as exc:
        raise UnreadableInstance(f"cannot decode pixel data ({type(exc).__name__}: {_short(exc)})") from None


def iter_frames(ds: Dataset, frames: list[int] | None = None, info: ImagePixel | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, stored values) for ``frames`` (default all), decoding each once."""
    info = info or ImagePixel.of(ds)
    wanted = list(range(info.number_of_frames)) if frames is None else list(frames)
    if info.number_of_frames == 1:
        yield from ((f, decode_frame(ds, 0)) for f in wanted[:1])
        return
    try:
        for f, arr in zip(wanted, iter_pixels(ds, indices=wanted)):
            yield f, arr
    except UnreadableInstance:
        raise
    except Exception as exc:
        raise UnreadableInstance(f"cannot decode pixel data ({type(exc).__name__}: {_short(exc)})") from None


# --------------------------------------------------------------------------- grey


@dataclass(frozen=True, slots=True)
class RenderedFrame:
    """8-bit display pixels of one frame and the window that produced them."""

    pixels: np.ndarray  # uint8, (rows, columns) or (rows, columns, 3)
    window: str  # "dataset", "preset:lung", "percentile", "voi_lut", "rgb:...", "color", "C/W"
    window_center: float | None
    window_width: float | None


def _to_byte(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats to bytes, rounding to nearest."""
    return np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _domain(dtype: np.dtype) -> np.ndarray:
    """Every value of an 8/16-bit integer dtype, in the order of its unsigned bit pattern."""
    bits = dtype.itemsize * 8
    unsigned = np.arange(1 << bits, dtype=np.uint32).astype(np.dtype(f"u{dtype.itemsize}"))
    return unsigned.view(dtype)


def _voi_lut_unit(values: np.ndarray, view: Dataset) -> np.ndarray:
    """The VOI LUT Sequence applied to modality values, scaled to [0, 1]."""
    out = apply_voi_lut(values, view, index=0, prefer_lut=True)
    item = view.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2]) or 16
    top = float(np.max(np.asarray(item.LUTData)))
    bits = max(bits, int(top).bit_length())
    return (out.astype(np.float64) / float((1 << bits) - 1)).astype(np.float32)


_LUT_CACHE: dict[tuple[object, ...], np.ndarray] = {}


def _grey_lut(dtype: np.dtype, tf: FrameTransforms, window: VOIWindow | None, invert: bool) -> np.ndarray:
    """Lookup table (indexed by the unsigned bit pattern) from stored value to output byte."""
    use_voi_lut = window is None  # VOI LUT Sequence tables are per dataset: not cached
    key = (dtype.str, tf.modality_key, window, invert)
    lut = None if use_voi_lut else _LUT_CACHE.get(key)
    if lut is not None:
        return lut
    modality = apply_modality_lut(_domain(dtype), tf.view)
    unit = _voi_lut_unit(modality, tf.view) if window is None else window.apply(modality)
    if invert:
        unit = 1.0 - unit
    lut = _to_byte(unit)
    if len(_LUT_CACHE) > 64:
        _LUT_CACHE.clear()
    if not use_voi_lut:
        _LUT_CACHE[key] = lut
    return lut


def _grey(stored: np.ndarray, tf: FrameTransforms, windows: list[VOIWindow | None], invert: bool) -> np.ndarray:
    """Apply modality + each window (None = VOI LUT Sequence) and stack; one plane per window."""
    planes = []
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        index = stored.view(np.dtype(f"u{stored.dtype.itemsize}"))
        for w in windows:
            planes.append(np.take(_grey_lut(stored.dtype, tf, w, invert), index))  # take: ~2x faster than []
    else:
        modality = apply_modality_lut(stored, tf.view)
        for w in windows:
            unit = _voi_lut_unit(modality, tf.view) if w is None else w.apply(modality)
            planes.append(_to_byte(1.0 - unit if invert else unit))
    return planes[0] if len(planes) == 1 else np.ascontiguousarray(np.stack(planes, axis=-1))


def modality_values(stored: np.ndarray, tf: FrameTransforms, subsample: bool = True) -> np.ndarray:
    """Modality LUT output of ``stored`` (subsampled to ~256k pixels when ``subsample``)."""
    arr = stored
    if subsample and arr.size > 1 << 18:
        step = int(np.ceil(np.sqrt(arr.size / (1 << 18))))
        arr = arr[::step, ::step]
    return np.asarray(apply_modality_lut(arr, tf.view))


def choose_window(stored: np.ndarray, tf: FrameTransforms, spec: WindowSpec) -> list[VOIWindow | None]:
    """The window(s) for this frame under ``spec``; ``None`` stands for the VOI LUT Sequence."""
    if spec.mode in (WindowMode.EXPLICIT, WindowMode.RGB):
        return list(spec.windows)
    if spec.mode is WindowMode.DATASET:
        if tf.windows:
            return [tf.windows[0]]
        if tf.has_voi_lut:
            return [None]
    low, high = spec.percentiles
    return [percentile_window(modality_values(stored, tf), low, high)]


# --------------------------------------------------------------------------- colour


def _colour(stored: np.ndarray, ds: Dataset, info: ImagePixel) -> np.ndarray:
    """8-bit RGB of a colour frame."""
    if info.photometric_interpretation == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, ds)
        except Exception as exc:
            raise UnreadableInstance(f"cannot apply the palette ({type(exc).__name__}: {_short(exc)})") from None
        if rgb.dtype == np.uint8:
            return rgb
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in ds else 16
        bits = 16 if bits not in (8, 16) else bits
        return _scale_to_byte(rgb, bits)
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise UnreadableInstance(f"unsupported colour layout {stored.shape} for {info.photometric_interpretation}")
    if stored.dtype == np.uint8:
        return stored
    return _scale_to_byte(stored, min(info.bits_stored, stored.dtype.itemsize * 8))


def _scale_to_byte(values: np.ndarray, bits: int) -> np.ndarray:
    top = float((1 << bits) - 1)
    return np.clip(values.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- frame


def render_stored(stored: np.ndarray, ds: Dataset, frame: int, spec: WindowSpec, info: ImagePixel | None = None) -> RenderedFrame:
    """8-bit display pixels of one decoded frame of ``ds`` under ``spec``."""
    info = info or ImagePixel.of(ds)
    if not info.is_monochrome:
        return RenderedFrame(_colour(stored, ds, info), "color", None, None)
    if stored.ndim != 2:
        raise UnreadableInstance(f"unexpected grey frame shape {stored.shape}")
    tf = frame_transforms(ds, frame)
    invert = info.photometric_interpretation == "MONOCHROME1"
    try:
        windows = choose_window(stored, tf, spec)
        pixels = _grey(stored, tf, windows, invert)
    except UnreadableInstance:
        raise
    except Exception as exc:
        raise UnreadableInstance(f"cannot apply the LUTs ({type(exc).__name__}: {_short(exc)})") from None
    if spec.mode is WindowMode.RGB:
        return RenderedFrame(pixels, spec.name, None, None)
    chosen = windows[0]
    if chosen is None:
        return RenderedFrame(pixels, "voi_lut", None, None)
    return RenderedFrame(pixels, chosen.name, chosen.center, chosen.width)


def render_frame(ds: Dataset, frame: int = 0, spec: WindowSpec | None = None) -> RenderedFrame:
    """Decode and render one frame (0-based) of a dataset read by :func:`read_instance`."""
    info = ImagePixel.of(ds)
    if not 0 <= frame < info.number_of_frames:
        raise UnreadableInstance(f"frame {frame} out of range (1..{info.number_of_frames})")
    return render_stored(decode_frame(ds, frame), ds, frame, spec or WindowSpec.dataset(), info)

"""VOI windows: the dataset's own, named presets, explicit C/W, percentile, RGB packs.

A :class:`VOIWindow` is one window (center, width, VOI LUT Function) as defined
in DICOM PS3.3 C.11.2.1.2. A :class:`WindowSpec` is what the caller asks for;
it is resolved per frame into one window (grey) or three (RGB pack).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class VOIFunction(StrEnum):
    """(0028,1056) VOI LUT Function."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


@dataclass(frozen=True, slots=True)
class VOIWindow:
    """One window: Window Center (0028,1050), Window Width (0028,1051), VOI LUT Function.

    ``name`` says where it came from: ``dataset``, ``preset:lung``, ``percentile``
    or ``C/W`` for an explicit one.
    """

    center: float
    width: float
    function: VOIFunction = VOIFunction.LINEAR
    name: str = "C/W"

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Map modality values to [0, 1] (float32), per PS3.3 C.11.2.1.2 / C.11.2.1.3.

        LINEAR: below ``c - 0.5 - (w-1)/2`` → 0, above ``c - 0.5 + (w-1)/2`` → 1,
        else ``((x - (c - 0.5)) / (w - 1) + 0.5)``. LINEAR_EXACT uses c and w
        unmodified; SIGMOID is ``1 / (1 + exp(-4 (x - c) / w))``.
        """
        x = np.asarray(values, dtype=np.float64)
        c, w = float(self.center), float(self.width)
        if self.function is VOIFunction.SIGMOID:
            if w <= 0:
                raise ValueError("Window Width must be > 0 for SIGMOID")
            with np.errstate(over="ignore"):
                out = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
            return out.astype(np.float32)
        if self.function is VOIFunction.LINEAR_EXACT:
            if w <= 0:
                raise ValueError("Window Width must be > 0 for LINEAR_EXACT")
            out = (x - c) / w + 0.5
            return np.clip(out, 0.0, 1.0).astype(np.float32)
        if w < 1:
            raise ValueError("Window Width must be >= 1 for LINEAR")
        if w == 1:  # degenerate: a threshold at c - 0.5
            return (x > c - 0.5).astype(np.float32)
        out = (x - (c - 0.5)) / (w - 1.0) + 0.5
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    @property
    def label(self) -> str:
        """Compact text for manifests and file names, e.g. ``40/400``."""
        return f"{_num(self.center)}/{_num(self.width)}"


def _num(value: float) -> str:
    return f"{value:g}"


#: Named CT presets (center, width) in Hounsfield units.
PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40, 80),
    "subdural": (75, 215),
    "stroke": (40, 40),
    "temporal_bone": (600, 2800),
    "soft_tissue": (50, 350),
    "lung": (-600, 1500),
    "mediastinum": (40, 400),
    "abdomen": (40, 350),
    "liver": (60, 160),
    "bone": (500, 2000),
    "spine_soft": (50, 250),
    "angio": (300, 600),
    "pe": (100, 700),
}


def preset(name: str) -> VOIWindow:
    """The named preset as a window; raises ``KeyError`` listing the known names."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in PRESETS:
        raise KeyError(
            f"unknown window preset {name!r}; presets: {', '.join(sorted(PRESETS))}; or give CENTER/WIDTH, e.g. 40/400"
        )
    c, w = PRESETS[key]
    return VOIWindow(c, w, VOIFunction.LINEAR, f"preset:{key}")


class WindowMode(StrEnum):
    """How the window of a frame is chosen."""

    DATASET = "dataset"  # the first window of the frame, else the VOI LUT, else percentile
    EXPLICIT = "explicit"  # one given window (explicit C/W or preset)
    RGB = "rgb"  # three windows packed as R, G, B
    PERCENTILE = "percentile"  # always the percentile window


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """What the caller asks for; :meth:`parse` reads the CLI forms."""

    mode: WindowMode = WindowMode.DATASET
    windows: tuple[VOIWindow, ...] = ()
    percentiles: tuple[float, float] = (0.5, 99.5)

    @classmethod
    def dataset(cls) -> WindowSpec:
        """The dataset's first window (the default)."""
        return cls(WindowMode.DATASET)

    @classmethod
    def explicit(cls, center: float, width: float, function: VOIFunction = VOIFunction.LINEAR) -> WindowSpec:
        """One explicit window."""
        return cls(WindowMode.EXPLICIT, (VOIWindow(center, width, function, f"{_num(center)}/{_num(width)}"),))

    @classmethod
    def from_preset(cls, name: str) -> WindowSpec:
        """One named preset."""
        return cls(WindowMode.EXPLICIT, (preset(name),))

    @classmethod
    def rgb(cls, names: tuple[str, str, str] | list[str]) -> WindowSpec:
        """Three presets or ``C/W`` texts packed into R, G and B."""
        if len(names) != 3:
            raise ValueError("an RGB pack takes exactly three windows")
        return cls(WindowMode.RGB, tuple(parse_window(n) for n in names))

    @classmethod
    def percentile(cls, low: float = 0.5, high: float = 99.5) -> WindowSpec:
        """The window spanning the given percentiles of each frame."""
        return cls(WindowMode.PERCENTILE, (), (low, high))

    @property
    def name(self) -> str:
        """A short description for logs and manifests."""
        if self.mode is WindowMode.RGB:
            return "rgb:" + ",".join(w.name for w in self.windows)
        if self.mode is WindowMode.EXPLICIT:
            return self.windows[0].name
        return self.mode.value


_CW = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*[/,:]\s*(\d+(?:\.\d*)?)\s*$")


_NUMBER = re.compile(r"^\s*-?\d+(?:\.\d*)?\s*$")


def parse_window(text: str) -> VOIWindow:
    """A ``CENTER/WIDTH`` text (``-600/1500``) or a preset name as a window.

    Raises ``KeyError`` for anything else, naming the accepted forms and every preset.
    """
    m = _CW.match(text)
    if m:
        c, w = float(m.group(1)), float(m.group(2))
        return VOIWindow(c, w, VOIFunction.LINEAR, f"{_num(c)}/{_num(w)}")
    if _NUMBER.match(text) or any(ch.isdigit() for ch in text):
        raise KeyError(
            f"window {text.strip()!r} is neither CENTER/WIDTH (e.g. 40/400 or -600/1500) nor a preset; "
            f"presets: {', '.join(sorted(PRESETS))}"
        )
    return preset(text)


def percentile_window(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> VOIWindow:
    """A LINEAR_EXACT window spanning the ``low``..``high`` percentiles of ``values``.

    Used when a dataset gives no window: robust to a few extreme pixels
    (padding, metal) where a min/max window is not. Large frames are subsampled.
    """
    flat = np.asarray(values)
    if flat.ndim >= 2 and flat.size > 1 << 18:
        step = int(np.ceil(np.sqrt(flat.size / (1 << 18))))
        flat = flat[::step, ::step]
    lo, hi = np.percentile(flat, [low, high])
    lo, hi = float(lo), float(hi)
    if not np.isfinite(lo) or not np.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + 1.0
    return VOIWindow((lo + hi) / 2.0, hi - lo, VOIFunction.LINEAR_EXACT, "percentile")

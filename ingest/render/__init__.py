"""Rendering: DICOM frames to windowed 8-bit PNGs, and the images a 2D model should see.

Modules, one job each: :mod:`~ingest.render.pixels` (decode and LUTs),
:mod:`~ingest.render.windows` (windows, presets), :mod:`~ingest.render.selection`
(series and frames), :mod:`~ingest.render.resize` (pixel budget),
:mod:`~ingest.render.manifest` (manifest and ``images`` rows),
:mod:`~ingest.render.files` (PNG/JSON output), :mod:`~ingest.render.study`
(one study end to end), :mod:`~ingest.render.batch` (many files, the CLI's job).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module that defines it. Imported on first use (PEP 562), so that ``preread render``
#: does not import SQLAlchemy (the manifest's database half) or the catalog just to render files.
_EXPORTS = {
    "RenderError": "errors",
    "UnreadableInstance": "errors",
    "RenderedImage": "manifest",
    "StudyRendering": "manifest",
    "read_manifest": "manifest",
    "store_images": "manifest",
    "write_manifest": "manifest",
    "ImagePixel": "pixels",
    "RenderedFrame": "pixels",
    "read_instance": "pixels",
    "render_frame": "pixels",
    "FrameRef": "selection",
    "InstanceHeader": "selection",
    "Kind": "selection",
    "SelectionPolicy": "selection",
    "read_header": "selection",
    "select_frames": "selection",
    "render_study": "study",
    "PRESETS": "windows",
    "VOIFunction": "windows",
    "VOIWindow": "windows",
    "WindowMode": "windows",
    "WindowSpec": "windows",
    "parse_window": "windows",
    "preset": "windows",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_EXPORTS)

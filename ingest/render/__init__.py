"""Rendering: DICOM frames to windowed 8-bit PNGs, and the images a 2D model should see.

Modules, one job each: :mod:`~ingest.render.pixels` (decode and LUTs),
:mod:`~ingest.render.windows` (windows, presets), :mod:`~ingest.render.selection`
(series and frames), :mod:`~ingest.render.resize` (pixel budget),
:mod:`~ingest.render.manifest` (manifest and ``images`` rows),
:mod:`~ingest.render.files` (PNG/JSON output), :mod:`~ingest.render.study`
(one study end to end), :mod:`~ingest.render.batch` (many files, the CLI's job).
"""

from preread.ingest.render.errors import RenderError, UnreadableInstance
from preread.ingest.render.manifest import RenderedImage, StudyRendering, read_manifest, store_images, write_manifest
from preread.ingest.render.pixels import ImagePixel, RenderedFrame, read_instance, render_frame
from preread.ingest.render.selection import FrameRef, InstanceHeader, Kind, SelectionPolicy, read_header, select_frames
from preread.ingest.render.study import render_study
from preread.ingest.render.windows import PRESETS, VOIFunction, VOIWindow, WindowMode, WindowSpec, parse_window, preset

__all__ = [
    "PRESETS",
    "FrameRef",
    "ImagePixel",
    "InstanceHeader",
    "Kind",
    "RenderError",
    "RenderedFrame",
    "RenderedImage",
    "SelectionPolicy",
    "StudyRendering",
    "UnreadableInstance",
    "VOIFunction",
    "VOIWindow",
    "WindowMode",
    "WindowSpec",
    "parse_window",
    "preset",
    "read_header",
    "read_instance",
    "read_manifest",
    "render_frame",
    "render_study",
    "select_frames",
    "store_images",
    "write_manifest",
]

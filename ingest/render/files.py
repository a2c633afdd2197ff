"""Files in and out: expanding input paths, writing PNGs and JSON atomically (with the storage's writer).

PNGs are written by a small encoder of our own: the "Up" filter in numpy and
deflate by ISA-L (``isal``, level 1: ~0.25 ms for a 512² frame against ~3.5 ms
for zlib level 1, and smaller files), falling back to zlib when ``isal`` is
not installed. Output is a standard 8-bit grey or RGB, non-interlaced PNG.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

_deflate: ModuleType
try:
    from isal import isal_zlib

    _deflate = isal_zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
    _deflate = zlib
_LEVEL = 1

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of 8-bit ``pixels``: (rows, columns) grey or (rows, columns, 3) RGB."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"expected uint8 grey or RGB pixels, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up: each byte minus the byte above (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    colour_type = 0 if pixels.ndim == 2 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _deflate.compress(filtered.tobytes(), _LEVEL))
        + _chunk(b"IEND", b"")
    )


def write_png(path: Path, pixels: np.ndarray, *, atomic: bool = True) -> None:
    """Write 8-bit grey or RGB ``pixels`` to ``path``.

    ``atomic`` (temp file + rename) is for PNGs that readers may open while
    they are written (a study's images); a batch export skips the rename.
    """
    if not atomic:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(pixels))
        return
    from preread.ingest.storage.files import write_atomic  # here: `preread render` needs no storage stack

    # not fsynced: a PNG lost to a power cut is rendered again from the stored instances
    write_atomic(path, [encode_png(pixels)], sync=False)


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically (not fsynced, as :func:`write_png`)."""
    from preread.ingest.storage.files import write_atomic

    write_atomic(path, [json.dumps(payload, indent=2).encode() + b"\n"], sync=False)


def expand_inputs(paths: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """(file, path relative to its input root) for files and, recursively, folders.

    Hidden files and DICOMDIR are skipped in folders; a file named directly is
    always yielded (and fails later with a reason if it is not DICOM).
    """
    for root in paths:
        root = Path(root)
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith(".") or name.upper() == "DICOMDIR":
                        continue
                    file = Path(dirpath) / name
                    yield file, file.relative_to(root)
        else:
            yield root, Path(root.name)

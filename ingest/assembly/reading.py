"""Reading a DICOM file from disk, and telling when it was cut short.

pydicom does not raise on a file that ends early: it warns ("End of file
reached before delimiter ...") and drops the element it was reading, which
for a cut inside encapsulated pixel data is the whole Pixel Data element.
Every reader that must refuse such a file (discovery, rendering) reads
through :func:`read_file`. Warnings are kept out of the logs: they may quote
attribute values.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

#: The start of pydicom's warning for a data set that ends before its last element does.
END_OF_FILE_WARNING = "End of file reached"
#: The elements that hold an image's pixels.
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def has_pixel_data(ds: Dataset) -> bool:
    """Whether ``ds`` holds pixel data (integer, float or double float)."""
    return any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS)


def read_file(path: Path | str, **options: Any) -> tuple[Dataset, bool]:
    """``pydicom.dcmread(path, **options)``, and whether the file ends inside its pixel data.

    That is: pydicom reached the end of the file early and the data set has no
    pixel data left. pydicom's own exceptions propagate.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(os.fspath(path), **options)
    ended_early = any(END_OF_FILE_WARNING in str(w.message) for w in caught)
    return ds, ended_early and not has_pixel_data(ds)

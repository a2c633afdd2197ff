"""Fit a rendered frame into the model's pixel budget, as qwen-vl-utils would.

The target size comes from ``qwen_vl_utils.smart_resize`` (sides multiples of
28, area within ``min_pixels``..``max_pixels``, aspect kept), and the filter is
PIL's BICUBIC, which is what ``qwen_vl_utils.fetch_image`` uses
(``Image.resize`` default). A PNG already at that size passes through the
model's preprocessing without a second resampling.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from qwen_vl_utils import smart_resize

#: One visual token covers a 28x28 patch (14 px patches merged 2x2).
FACTOR = 28


def target_size(height: int, width: int, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(height, width) for a frame, or the frame's own size when no budget is given.

    Extreme aspect ratios (> 200:1, which ``smart_resize`` refuses) are clamped
    to the nearest multiples of 28 within the budget instead.
    """
    if min_pixels is None and max_pixels is None:
        return height, width
    low = min_pixels if min_pixels is not None else FACTOR * FACTOR * 4
    high = max_pixels if max_pixels is not None else max(low, FACTOR * FACTOR * 16384)
    high = max(high, low)
    try:
        return smart_resize(height, width, factor=FACTOR, min_pixels=low, max_pixels=high)
    except ValueError:
        scale = min(1.0, (high / float(height * width)) ** 0.5)
        h = max(FACTOR, int(height * scale) // FACTOR * FACTOR)
        w = max(FACTOR, int(width * scale) // FACTOR * FACTOR)
        return h, w


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``pixels`` (uint8 grey or RGB) resampled to (height, width) with BICUBIC."""
    if pixels.shape[:2] == (height, width):
        return pixels
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def fit(pixels: np.ndarray, min_pixels: int | None, max_pixels: int | None) -> np.ndarray:
    """``pixels`` resized into the budget (unchanged when no budget is given)."""
    h, w = target_size(pixels.shape[0], pixels.shape[1], min_pixels, max_pixels)
    return resize(pixels, h, w)

"""Fit a rendered frame into the model's pixel budget, as qwen-vl-utils would.

The target size is ``qwen_vl_utils.smart_resize``'s (sides multiples of 28,
area within ``min_pixels``..``max_pixels``, aspect kept), and the filter is
PIL's BICUBIC, which is what ``qwen_vl_utils.fetch_image`` uses
(``Image.resize`` default). A PNG already at that size passes through the
model's preprocessing without a second resampling.

:func:`smart_resize` is a verbatim port: importing ``qwen_vl_utils`` pulls in
torch and torchvision (~3 s per process), too slow for render workers.
``tests/test_render_resize.py`` checks it against the original.
"""

from __future__ import annotations

import math

import numpy as np

#: One visual token covers a 28x28 patch (14 px patches merged 2x2).
FACTOR = 28
#: qwen_vl_utils.vision_process.MAX_RATIO: smart_resize refuses longer/shorter above this.
MAX_RATIO = 200


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """qwen_vl_utils.smart_resize: sides multiples of ``factor``, area in [min, max], aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


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
        if h * w > high:  # the short side hit its 28 px floor: shorten the long side
            if h >= w:
                h = max(FACTOR, high // w // FACTOR * FACTOR)
            else:
                w = max(FACTOR, high // h // FACTOR * FACTOR)
        return h, w


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``pixels`` (uint8 grey or RGB) resampled to (height, width) with BICUBIC."""
    if pixels.shape[:2] == (height, width):
        return pixels
    from PIL import Image  # only when a budget resizes: plain `preread render` starts without PIL

    image = Image.fromarray(pixels)
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def fit(pixels: np.ndarray, min_pixels: int | None, max_pixels: int | None) -> np.ndarray:
    """``pixels`` resized into the budget (unchanged when no budget is given)."""
    h, w = target_size(pixels.shape[0], pixels.shape[1], min_pixels, max_pixels)
    return resize(pixels, h, w)

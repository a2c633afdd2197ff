"""Pixel budget: the same target sizes as qwen-vl-utils, sides multiples of 28."""

from __future__ import annotations

import numpy as np
import pytest

from preread.ingest.render.resize import fit, smart_resize, target_size

SIZES = [(512, 512), (64, 64), (1955, 1841), (1760, 1760), (3328, 4096), (100, 2400), (28, 28), (10, 10), (480, 640), (2294, 1914)]
BUDGETS = [(4 * 784, 16384 * 784), (256 * 784, 1280 * 784), (64 * 784, 64 * 784), (3136, 200_000)]


def test_port_equals_qwen_vl_utils() -> None:
    qwen = pytest.importorskip("qwen_vl_utils")
    for h, w in SIZES:
        for low, high in BUDGETS:
            assert smart_resize(h, w, 28, low, high) == qwen.smart_resize(h, w, factor=28, min_pixels=low, max_pixels=high)


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_fit_into_budget(h: int, w: int) -> None:
    low, high = 256 * 784, 1280 * 784
    out = fit(np.zeros((h, w), np.uint8), low, high)
    th, tw = out.shape
    assert th % 28 == 0 and tw % 28 == 0 and low <= th * tw <= high
    assert abs(th / tw - h / w) / (h / w) < 0.25


def test_no_budget_keeps_full_resolution() -> None:
    assert target_size(1955, 1841, None, None) == (1955, 1841)
    assert fit(np.zeros((7, 9, 3), np.uint8), None, None).shape == (7, 9, 3)


def test_extreme_aspect_is_clamped_not_refused() -> None:
    h, w = target_size(10, 4000, None, 100_000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 100_000

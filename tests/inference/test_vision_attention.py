"""The vision tower's window attention, batched by window length, equals transformers' own sdpa path.

``worker/inference/vision_attention.py`` replaces transformers' loop of one
attention call per window with one call per window length. These tests hold it
to the library: the vision tower's output, and a draft's greedy tokens and
logits, on real PNGs whose sizes leave partial windows at the edges; that the
loaded model uses it; that it really makes fewer calls; and that transformers
is still the exact version whose dispatch it relies on.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from preread.worker.inference import vision_attention
from preread.worker.inference.engine import Engine, StudyContext
from preread.worker.inference.model import LoadedModel, load_model
from preread.worker.inference.vision_attention import WINDOWED_SDPA, plan_groups
from tests.support.tiny_model import write_test_pngs

ROOT = Path(__file__).resolve().parents[2]
#: Pixel budget that gives each test image several windows, full and partial.
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 640 * 28 * 28}
CT = StudyContext("CT", "HEAD", "CT HEAD WITHOUT CONTRAST", "081Y", "M")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    """A private copy of the tiny model, loaded as the worker loads it."""
    torch.set_num_threads(1)
    return load_model(str(tiny_model_dir), device="cpu", **PIXELS)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three slices of different sizes: full windows, partial ones at the edges, and two images alike."""
    return write_test_pngs(tmp_path_factory.mktemp("ct"), [(600, 520), (448, 448), (448, 448)], seed=5)


@pytest.fixture
def library_sdpa(loaded: LoadedModel) -> Iterator[None]:
    """The vision tower on transformers' own sdpa path for the duration of a test."""
    vision_config = loaded.model.config.vision_config
    vision_config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        vision_config._attn_implementation = WINDOWED_SDPA


def vision_inputs(loaded: LoadedModel, images: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The image processor's patches and grids for ``images``, as the engine prepares them."""
    from PIL import Image

    processed = loaded.processor.image_processor(images=[Image.open(p).convert("RGB") for p in images],
                                                 return_tensors="pt")
    return processed["pixel_values"], processed["image_grid_thw"]


def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count calls to the registered function and to torch's sdpa inside it."""
    counts = {"layers": 0, "sdpa": 0}
    real_attention, real_sdpa = vision_attention.windowed_sdpa_attention, vision_attention.scaled_dot_product_attention

    def attention(*args: Any, **kwargs: Any) -> Any:
        counts["layers"] += 1
        return real_attention(*args, **kwargs)

    def sdpa(*args: Any, **kwargs: Any) -> Any:
        counts["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    from transformers import AttentionInterface

    monkeypatch.setattr(vision_attention, "scaled_dot_product_attention", sdpa)
    AttentionInterface.register(WINDOWED_SDPA, attention)
    monkeypatch.setattr(vision_attention, "windowed_sdpa_attention", attention)
    return counts


def test_the_loaded_model_uses_it_for_the_vision_tower_only(loaded: LoadedModel) -> None:
    assert loaded.model.config.vision_config._attn_implementation == WINDOWED_SDPA
    assert loaded.model.config.text_config._attn_implementation == "sdpa"


def test_vision_tower_output_equals_the_library_sdpa_path(
    loaded: LoadedModel, study: list[Path], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    pixels, grids = vision_inputs(loaded, study)
    visual = loaded.model.model.visual
    counts = count_calls(monkeypatch)
    with torch.inference_mode():
        ours = visual(pixels, grid_thw=grids).pooler_output
    request.getfixturevalue("library_sdpa")
    with torch.inference_mode():
        theirs = visual(pixels, grid_thw=grids).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    # one call per layer, and per layer one sdpa per window length, where the library makes one per window
    depth = visual.config.depth
    assert counts["layers"] == depth
    window = visual.config.window_size // visual.config.patch_size // visual.config.spatial_merge_size
    windows = sum(-(-int(h) // 2 // window) * -(-int(w) // 2 // window) for _, h, w in grids.tolist())
    library_calls = (depth - len(visual.fullatt_block_indexes)) * windows + len(visual.fullatt_block_indexes) * len(grids)
    assert windows >= 10
    assert counts["sdpa"] * 3 <= library_calls


def test_a_draft_is_the_same_on_either_path(loaded: LoadedModel, study: list[Path], request: pytest.FixtureRequest) -> None:
    """Greedy tokens and their logits, through the engine's own inputs, on both vision paths."""
    engine = Engine(loaded)
    try:
        from qwen_vl_utils import process_vision_info

        messages = engine._messages(study, engine.prompts.probe_questions(CT)[0][1])

        text = engine.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        vision, _ = process_vision_info(messages)
        inputs = engine._inputs([text], vision)

        def generate() -> Any:
            with torch.inference_mode():
                return loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False,
                                             output_logits=True, return_dict_in_generate=True)

        ours = generate()
        request.getfixturevalue("library_sdpa")
        theirs = generate()
    finally:
        engine.close()
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=0, atol=1e-4)


def test_plan_groups_windows_by_length_wherever_they_lie() -> None:
    """Full windows back to back become a slice; lengths that interleave become one index."""
    groups = {g.length: g for g in plan_groups([0, 4, 8, 10, 14, 16, 16, 19], torch.device("cpu"))}
    assert sorted(groups) == [2, 3, 4]
    assert groups[4].count == 3 and isinstance(groups[4].positions, torch.Tensor)
    assert groups[4].positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]
    assert groups[2].count == 2 and isinstance(groups[2].positions, torch.Tensor)
    assert groups[2].positions.tolist() == [8, 9, 14, 15]
    assert (groups[3].count, groups[3].positions) == (1, slice(16, 19))
    back_to_back = plan_groups([0, 5, 10, 15], torch.device("cpu"))
    assert [(g.length, g.count, g.positions) for g in back_to_back] == [(5, 3, slice(0, 15))]


def test_transformers_is_the_version_whose_dispatch_it_relies_on() -> None:
    """The pin in pyproject.toml is exact, and it is what is installed; the vision attention still
    hands its window boundaries to implementations named with ``flash``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in project["project"]["dependencies"] if re.match(r"transformers\b", d)]
    assert pins == [f"transformers=={transformers.__version__}"], (
        "worker/inference/vision_attention.py relies on transformers' Qwen2.5-VL vision attention dispatch; "
        "review it before moving the pin")
    import inspect

    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    source = inspect.getsource(modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention.forward)
    assert "is_flash_attention_requested(self.config)" in source and "cu_seq_lens_q=cu_seqlens" in source

"""Loading the tiny Qwen2.5-VL through worker/model.py, as a real checkpoint would be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from preread.schemas.tables import ParseStatus
from tests.support.tiny_model import write_test_pngs
from preread.worker.inference.engine import DraftResult, Engine, StudyContext
from preread.worker.inference.model import get_model, load_model

PIXELS = {"min_pixels": 56 * 56, "max_pixels": 96 * 28 * 28}


@pytest.fixture(scope="session")
def two_pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real PNG files of different sizes (8-bit grey, as the renderer writes them)."""
    return write_test_pngs(tmp_path_factory.mktemp("pngs"))


def test_tiny_model_loads_without_missing_or_unexpected_keys(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu", **PIXELS)
    info = loaded.loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.model.config._attn_implementation == "sdpa"
    config = loaded.model.config
    tok = loaded.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_config.patch_size == 14 and config.vision_config.spatial_merge_size == 2
    assert tok.convert_tokens_to_ids("<|im_end|>") in loaded.model.generation_config.eos_token_id
    assert len(tok) <= config.text_config.vocab_size


def test_get_model_is_cached(tiny_model_dir: Path) -> None:
    first = get_model(str(tiny_model_dir), device="cpu", **PIXELS)
    assert get_model(str(tiny_model_dir), device="cpu", **PIXELS) is first
    assert first.revision is None  # a local folder has no commit hash


def test_chat_template_puts_images_in_vision_blocks(tiny_model_dir: Path) -> None:
    loaded = get_model(str(tiny_model_dir), device="cpu", **PIXELS)
    messages = [{"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": "Is there a fracture?"}]}]
    text = loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Is there a fracture?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_engine_drafts_two_pngs(tiny_model_dir: Path, two_pngs: list[Path]) -> None:
    engine = Engine(get_model(str(tiny_model_dir), device="cpu", **PIXELS))
    try:
        result = engine.draft(two_pngs, StudyContext("CR", "CHEST", "CHEST PA", "045Y", "F"))
    finally:
        engine.close()
    assert isinstance(result, DraftResult)
    assert result.parse_status == ParseStatus.OK, result.parse_error
    assert result.raw_output and result.report is not None
    assert result.n_images == 2 and result.prompt_tokens > 0 and result.completion_tokens > 0


def test_pixel_budget_is_applied(tiny_model_dir: Path) -> None:
    from PIL import Image

    loaded = get_model(str(tiny_model_dir), device="cpu", **PIXELS)
    assert loaded.processor.image_processor.size.longest_edge == PIXELS["max_pixels"]
    out = loaded.processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[Image.new("RGB", (900, 700))], return_tensors="pt"
    )
    t, h, w = out["image_grid_thw"][0].tolist()
    assert h * w * 14 * 14 <= PIXELS["max_pixels"]


def test_engine_from_settings(tiny_model_dir: Path, two_pngs: list[Path]) -> None:
    from preread.schemas.settings import Settings
    from preread.worker.inference.engine import get_engine

    settings = Settings(model=str(tiny_model_dir), device="cpu", batch_wait_ms=1.0, **PIXELS)
    engine = get_engine(settings)
    assert get_engine(settings) is engine
    assert engine.loaded is get_model(str(tiny_model_dir), device="cpu", **PIXELS)  # one model per process
    assert engine.mode == "json" and engine.think is False
    chest = StudyContext("CR", "CHEST", None, None, None)
    probes = engine.probe(two_pngs, chest)
    # one score per question of the chest profile in the packaged prompts, in their order
    assert [(p.condition, p.question) for p in probes] == engine.prompts.probe_questions(chest)
    assert len(probes) >= 8 and all(0.0 <= p.score <= 1.0 for p in probes)


def test_another_pixel_budget_shares_the_weights(tiny_model_dir: Path) -> None:
    """A retry with a smaller budget (after CUDA ran out of memory) must not load a second copy."""
    full = get_model(str(tiny_model_dir), device="cpu", **PIXELS)
    smaller = get_model(str(tiny_model_dir), device="cpu", min_pixels=PIXELS["min_pixels"], max_pixels=PIXELS["max_pixels"] // 2)
    assert smaller.model is full.model
    assert smaller.processor is not full.processor
    assert smaller.processor.image_processor.size["longest_edge"] == PIXELS["max_pixels"] // 2

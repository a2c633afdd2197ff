"""Loading InfiMed / Qwen2.5-VL once per process, exactly as the model card does.

``Qwen2_5_VLForConditionalGeneration.from_pretrained`` with bf16 on CUDA
(float32 on CPU) and sdpa attention, ``AutoProcessor.from_pretrained`` with
the pixel budget. The vision tower's window attention then runs batched by
window length (:mod:`~preread.worker.inference.vision_attention`: the same
arithmetic in a handful of calls per layer instead of one per window). The loaded pair is cached per (model, revision, device,
min/max pixels) so every caller in a worker process shares one copy.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from preread.schemas.settings import Settings
from preread.worker.inference.vision_attention import use_windowed_vision_attention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model with its processor and provenance."""

    model: Any  # Qwen2_5_VLForConditionalGeneration
    processor: Any  # Qwen2_5_VLProcessor
    device: torch.device
    dtype: torch.dtype
    model_id: str
    revision: str | None
    min_pixels: int
    max_pixels: int
    loading_info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer


def resolve_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as the model card), float32 on CPU (bf16 matmuls are slow and inexact there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load_weights(model_id: str, revision: str | None, dev: torch.device) -> tuple[Any, dict[str, Any]]:
    """The model weights, as the model card loads them."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    # a (model, loading info) pair with output_loading_info=True, which transformers' types do not say
    loaded: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_id,
        revision=revision or "main",
        dtype=dtype_for(dev),
        attn_implementation="sdpa",
        device_map=str(dev) if dev.type == "cuda" else None,
        output_loading_info=True,
    )
    model, info = loaded
    use_windowed_vision_attention(model)
    return model.to(dev).eval(), dict(info)


def _load_processor(model_id: str, revision: str | None, min_pixels: int, max_pixels: int) -> Any:
    """The processor with the pixel budget, as the model card loads it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        model_id, revision=revision, min_pixels=min_pixels, max_pixels=max_pixels
    )
    # transformers 5 already turned the budget into image_processor.size; the copies it also keeps
    # in the tokenizer's init kwargs would be passed again on every call (a deprecated path).
    for key in ("min_pixels", "max_pixels"):
        getattr(processor.tokenizer, "init_kwargs", {}).pop(key, None)
    size = processor.image_processor.size
    if getattr(size, "shortest_edge", min_pixels) != min_pixels or getattr(size, "longest_edge", max_pixels) != max_pixels:
        raise RuntimeError(f"pixel budget not applied to the image processor: {size}")
    return processor


def _assemble(model_id: str, revision: str | None, dev: torch.device, weights: tuple[Any, dict[str, Any]],
              processor: Any, min_pixels: int, max_pixels: int) -> LoadedModel:
    model, info = weights
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(
        model=model,
        processor=processor,
        device=dev,
        dtype=dtype_for(dev),
        model_id=model_id,
        revision=commit or revision,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        loading_info=info,
    )


def load_model(
    model_id: str,
    revision: str | None = None,
    device: str = "auto",
    min_pixels: int = 256 * 28 * 28,
    max_pixels: int = 1280 * 28 * 28,
) -> LoadedModel:
    """Load a fresh model and processor (uncached; use :func:`get_model`)."""
    dev = resolve_device(device)
    loaded = _assemble(model_id, revision, dev, _load_weights(model_id, revision, dev),
                       _load_processor(model_id, revision, min_pixels, max_pixels), min_pixels, max_pixels)
    log.info("loaded model %s (revision %s) on %s as %s", model_id, loaded.revision, dev, loaded.dtype)
    return loaded


_lock = threading.Lock()


@lru_cache(maxsize=2)
def _cached_weights(model_id: str, revision: str | None, device: str) -> tuple[Any, dict[str, Any]]:
    weights = _load_weights(model_id, revision, torch.device(device))
    log.info("loaded model %s (revision %s) on %s", model_id, revision, device)
    return weights


@lru_cache(maxsize=8)
def _cached_processor(model_id: str, revision: str | None, min_pixels: int, max_pixels: int) -> Any:
    return _load_processor(model_id, revision, min_pixels, max_pixels)


def get_model(
    model_id: str,
    revision: str | None = None,
    device: str = "auto",
    min_pixels: int = 256 * 28 * 28,
    max_pixels: int = 1280 * 28 * 28,
) -> LoadedModel:
    """The process-wide model for these parameters, loaded on first use.

    The weights are loaded once per (model, revision, device); another pixel
    budget (a retry after CUDA ran out of memory) gets its own processor and
    shares the weights.
    """
    with _lock:
        return _cached_loaded(model_id, revision, str(resolve_device(device)), min_pixels, max_pixels)


@lru_cache(maxsize=8)
def _cached_loaded(model_id: str, revision: str | None, device: str, min_pixels: int, max_pixels: int) -> LoadedModel:
    weights = _cached_weights(model_id, revision, device)
    processor = _cached_processor(model_id, revision, min_pixels, max_pixels)
    return _assemble(model_id, revision, torch.device(device), weights, processor, min_pixels, max_pixels)


def get_model_for_settings(settings: Settings) -> LoadedModel:
    """The process-wide model named by ``Settings`` (model, revision, device, pixel budget)."""
    return get_model(
        settings.model, settings.model_revision, settings.device, settings.min_pixels, settings.max_pixels
    )


def device_problem(model_id: str, device: str) -> str | None:
    """Why ``device`` cannot run ``model_id`` here, in one line with the fix; None when it can."""
    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError):
        return f"model {model_id}: device {device!r} is not known; set PREREAD_DEVICE=auto, cpu, cuda or cuda:N"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"model {model_id}: device {device} has no CUDA GPU on this machine; set PREREAD_DEVICE=cpu (or auto)"
    return None


def folder_problem(model_id: str, device: str) -> str | None:
    """Why a model named as a local folder cannot be loaded (the folder is missing), in one line; else None."""
    from pathlib import Path

    path = Path(model_id).expanduser()
    looks_local = model_id.startswith(("/", ".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "holds no model (no config.json)"
        return f"model folder {model_id} {what} (device {device}); set PREREAD_MODEL=/path/to/folder"
    return None

"""The vision tower per study: transformers' window attention loop against ours, batched by window length.

Builds Qwen2.5-VL-3B's vision tower (real widths, random weights; nothing
downloaded) and encodes the same studies of two 1024x1024 images (the pixel
budget ``bench/gpu.py`` uses) on transformers' own ``sdpa`` path, one attention
call per window, and on ``worker/inference/vision_attention.py``'s, one call
per window length; in alternation, so both see the same machine. Prints
per-study time, studies/s, the ratio to the library's path in the same run,
the attention calls per study and the largest difference between the outputs.

    python bench/vision.py                                   # CUDA, 32 layers, bf16
    OMP_NUM_THREADS=1 python bench/vision.py --device cpu --layers 4 --studies 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from preread.worker.inference import vision_attention  # noqa: E402
from bench.gpu import QWEN25_VL_3B_VISION, sync  # noqa: E402  (the same dimensions as the whole-model bench)
from preread.worker.inference.model import dtype_for  # noqa: E402


def build_tower(device: torch.device, layers: int) -> Any:
    """The vision tower with real widths and ``layers`` blocks (a full-attention block every eighth, as the 3B)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    full = [i for i in QWEN25_VL_3B_VISION["fullatt_block_indexes"] if i < layers] or [layers - 1]
    config = Qwen2_5_VLVisionConfig(**dict(QWEN25_VL_3B_VISION, depth=layers, fullatt_block_indexes=full))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype_for(device))
    return tower.eval()


def study_inputs(device: torch.device, side: int, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of ``images`` images of ``side`` pixels, as Qwen2-VL's image processor lays them out."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = smart_resize(side, side, factor=28, min_pixels=56 * 56, max_pixels=side * side)
    grid = torch.tensor([[1, height // 14, width // 14]] * images, device=device)
    patches = int(grid.prod(-1).sum())
    generator = torch.Generator(device="cpu").manual_seed(1)
    pixels = torch.randn(patches, 3 * 2 * 14 * 14, generator=generator).to(device, dtype_for(device))
    return pixels, grid


def encode(tower: Any, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return tower(pixels, grid_thw=grid).pooler_output


def count_sdpa_calls(tower: Any, pixels: torch.Tensor, grid: torch.Tensor) -> int:
    """torch sdpa calls per study on the tower's current path."""
    calls = 0
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    vision_attention.scaled_dot_product_attention = counting
    try:
        encode(tower, pixels, grid)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        vision_attention.scaled_dot_product_attention = real
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32, help="vision blocks (32 in the 3B)")
    parser.add_argument("--studies", type=int, default=20, help="timed studies per path")
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--images", type=int, default=2, help="images per study")
    args = parser.parse_args()

    device = torch.device(args.device)
    tower = build_tower(device, args.layers)
    pixels, grid = study_inputs(device, args.side, args.images)
    paths = {"transformers sdpa, one call per window (baseline)": "sdpa",
             "batched by window length (ours)": vision_attention.register()}

    def use(name: str) -> None:
        tower.config._attn_implementation = name

    outputs, calls, times = {}, {}, {label: [] for label in paths}
    for label, name in paths.items():
        use(name)
        outputs[label] = encode(tower, pixels, grid).float()  # warm-up, and the output compared
        calls[label] = count_sdpa_calls(tower, pixels, grid)
    for _ in range(args.studies):
        for label, name in paths.items():
            use(name)
            sync(device)
            started = time.perf_counter()
            encode(tower, pixels, grid)
            sync(device)
            times[label].append(time.perf_counter() - started)

    baseline = next(iter(paths))
    base_ms = statistics.median(times[baseline]) * 1000
    print(f"vision tower: {args.layers} blocks, {args.images} x {args.side}^2 images a study "
          f"({int(grid.prod(-1).sum())} patches), {device}, {dtype_for(device)}, {args.studies} studies per path")
    print("| path | ms/study (median) | studies/s | ratio | sdpa calls/study | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in paths:
        ms = statistics.median(times[label]) * 1000
        diff = (outputs[label] - outputs[baseline]).abs().max().item()
        print(f"| {label} | {ms:.1f} | {1000 / ms:.2f} | {base_ms / ms:.2f}x | {calls[label]} | {diff:.2e} |")


if __name__ == "__main__":
    main()

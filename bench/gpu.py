"""GPU throughput of the inference engine: the seed's way against the dynamic batcher.

Builds a random-weight model with the real Qwen2.5-VL-3B dimensions directly on
the GPU (nothing downloaded; the tokenizer is the tests' tiny byte-level BPE with
Qwen's special tokens), then on the same synthetic studies (2 images each, a
1024x1024 pixel budget, exactly ``--new-tokens`` new tokens each) measures:

* the seed's way: one ``model.generate`` per study, as the model card's snippet;
* the batcher: threads call ``Engine.draft`` and the model thread batches them;
* with ``--static-cache``, the batcher again with a static key/value cache whose
  decode step is compiled (on CUDA; on CPU only with ``--compile``);
* probes: threads call ``Engine.probe``; first one full row per question
  (images encoded once per study; the former way, the baseline), then the
  shared prefix (images and shared prompt prefilled once per study, each
  question a short suffix on that cache);

the two baselines (the seed's way, full-row probes) run the vision tower on
transformers' own sdpa path (one attention call per window), as before; the
other phases on the worker's (``worker/inference/vision_attention.py``: one
call per window length), as ``load_model`` sets it up;

and prints one table with studies/hour, probe questions/s and peak GPU memory,
with ratios against the seed's way and the full-row probes of the same run.
Each phase stops at its time budget and reports what it completed, so the whole
run stays within ``--time-limit`` seconds.

    python bench/gpu.py                      # CUDA, real 3B dimensions, 200 studies
    python bench/gpu.py --static-cache       # also the static cache with a compiled decode step
    python bench/gpu.py --device cpu --tiny  # smoke check with the tiny test model
    python bench/gpu.py --phases seed,static --studies 100  # only these phases (the compile alone takes minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from preread.worker.inference.engine import Engine, GenerationOptions, StudyContext  # noqa: E402
from preread.worker.inference.model import LoadedModel, dtype_for, load_model  # noqa: E402
from preread.worker.inference.vision_attention import use_windowed_vision_attention  # noqa: E402

#: Qwen2.5-VL-3B-Instruct's dimensions (InfiMed-SFT/RL-3B share them).
QWEN25_VL_3B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True,
}
QWEN25_VL_3B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
    "in_channels": 3,
    "tokens_per_second": 2,
}
CTX = StudyContext("CR", "CHEST", "CHEST PA AND LATERAL", "060Y", "F")


@dataclass
class Row:
    """One line of the result table."""

    name: str
    done: int
    total: int
    seconds: float
    rate: float
    unit: str
    peak_gib: float | None
    note: str = ""


def build_real_dims(device: torch.device, min_pixels: int, max_pixels: int, layers: int | None = None) -> LoadedModel:
    """Random weights with the real 3B dimensions, initialised on the device (bf16 on CUDA, sdpa).

    ``layers`` (a debugging aid) keeps the real widths but only that many text and vision layers.
    """
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from tests.support.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

    tokenizer = train_tokenizer(1000)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(QWEN25_VL_3B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(QWEN25_VL_3B_VISION)
    if layers:
        text["num_hidden_layers"] = layers
        vision.update(depth=layers, fullatt_block_indexes=[layers - 1])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    dtype = dtype_for(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.eval()
    use_windowed_vision_attention(model)  # as load_model does
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    image_processor = Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        chat_template=CHAT_TEMPLATE,
    )
    return LoadedModel(model, processor, device, dtype, "random/qwen2.5-vl-3b-dims", None, min_pixels, max_pixels)


def study_images(index: int, side: int) -> list[Any]:
    """Two synthetic grey radiograph-like images of one study (deterministic per index)."""
    from PIL import Image

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    images = []
    for k in range(2):
        base = 110 + 60 * np.sin(x / (19.0 + k + index % 7)) * np.cos(y / 29.0)
        noise = rng.normal(0, 10, (side, side)).astype(np.float32)
        images.append(Image.fromarray((base + noise).clip(0, 255).astype(np.uint8), mode="L").convert("RGB"))
    return images


def vision_path(loaded: LoadedModel, library: bool) -> None:
    """The vision tower on transformers' sdpa path (the baselines) or on the worker's (the other phases)."""
    if library:
        loaded.model.config.vision_config._attn_implementation = "sdpa"
    else:
        use_windowed_vision_attention(loaded.model)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_way(loaded: LoadedModel, prompt: str, images: list[Any], new_tokens: int) -> int:
    """One study exactly as the model card's snippet: template, vision info, processor, generate, trim, decode."""
    from qwen_vl_utils import process_vision_info

    content: list[dict[str, Any]] = [
        {"type": "image", "image": im, "min_pixels": loaded.min_pixels, "max_pixels": loaded.max_pixels} for im in images
    ]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
    processor, model = loaded.processor, loaded.model
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")
    inputs = inputs.to(loaded.device)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    trimmed = [out[len(inp) :] for inp, out in zip(inputs.input_ids, generated, strict=True)]
    processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return int(trimmed[0].shape[0])


def run_threads(n: int, threads: int, deadline: float, call: Callable[[int], int]) -> tuple[int, float, list[int]]:
    """Call ``call(i)`` for i < n from ``threads`` threads until the deadline; (completed, seconds, results).

    A failed call is reported once and not counted, so one error does not lose the whole phase.
    """
    results: list[int] = []
    errors: list[str] = []
    start = time.perf_counter()

    def task(i: int) -> int | None:
        if time.perf_counter() > deadline:
            return None
        try:
            return call(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for value in pool.map(task, range(n)):
            if value is not None:
                results.append(value)
    if errors:
        print(f"  {len(errors)} calls failed, first: {errors[0]}", flush=True)
    return len(results), time.perf_counter() - start, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of real 3B dimensions")
    parser.add_argument("--studies", type=int, default=None, help="synthetic studies (default 200; 12 with --tiny)")
    parser.add_argument("--layers", type=int, default=None, help="debug: real widths but this many layers")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--side", type=int, default=None, help="synthetic image side in pixels (1024; 448 with --tiny)")
    parser.add_argument("--max-pixels", type=int, default=1024 * 1024, help="pixel budget per image")
    parser.add_argument("--batch-size", type=int, default=50, help="drafts per batch")
    parser.add_argument("--probe-rows", type=int, default=32, help="probe questions per forward pass")
    parser.add_argument("--wait-ms", type=float, default=50.0, help="batcher wait for a batch to fill")
    parser.add_argument("--threads", type=int, default=None, help="submitting threads (default 2 x batch size)")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds for the whole run")
    parser.add_argument("--seed-limit", type=float, default=110.0, help="seconds for the seed's-way phase")
    parser.add_argument("--probe-limit", type=float, default=50.0, help="seconds for each probe phase")
    parser.add_argument(
        "--static-cache", action="store_true",
        help="also run the batcher with a static key/value cache (decode compiled on CUDA) against the dynamic one",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="compile the static-cache decode step on CPU too (slow)")
    parser.add_argument(
        "--phases", default="seed,dynamic,static,probes",
        help="comma list of phases to run: seed, dynamic, static (implies --static-cache), probes",
    )  # fmt: skip
    args = parser.parse_args(argv)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - {"seed", "dynamic", "static", "probes"}
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from seed, dynamic, static, probes")
    if "static" in phases and args.phases != parser.get_default("phases"):
        args.static_cache = True

    t0 = time.perf_counter()
    hard_deadline = t0 + args.time_limit
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n = args.studies or (12 if args.tiny else 200)
    args.side = args.side or (448 if args.tiny else 1024)
    min_pixels = 256 * 28 * 28
    if args.tiny:
        from tests.support.tiny_model import build_tiny_model

        folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-qwen-")))
        loaded = load_model(str(folder), device=str(device), min_pixels=min_pixels, max_pixels=args.max_pixels)
    else:
        loaded = build_real_dims(device, min_pixels, args.max_pixels, args.layers)
    sync(device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in loaded.model.parameters()) / 1e9
    common = {"batch_size": args.batch_size, "probe_batch_rows": args.probe_rows, "batch_wait_ms": args.wait_ms}
    # The batcher without and (with --static-cache) with the static cache; probes full-row and shared-prefix.
    dynamic = Engine(loaded, static_cache=False, shared_prefix=False, **common)
    static = (
        Engine(loaded, static_cache=True, compile_decode=device.type == "cuda" or args.compile, shared_prefix=True, **common)
        if args.static_cache
        else None
    )
    engine = dynamic
    prompt = engine.prompts.draft_prompt(CTX, "json", think=False)
    images = [study_images(i, args.side) for i in range(n)]
    exact = GenerationOptions(constrained=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    print(
        f"model: {loaded.model_id if not args.tiny else 'tiny test model'} ({params:.2f} B params, {loaded.dtype}, "
        f"{device}), built in {build_s:.1f}s; {n} studies x 2 images {args.side}px, budget {args.max_pixels} px, "
        f"{args.new_tokens} new tokens each",
        flush=True,
    )

    # warm-up (not timed): CUDA kernels, allocator, the batcher's thread; both vision paths
    vision_path(loaded, library=True)
    seed_way(loaded, prompt, images[0], 4)
    engine.probe(images[0], CTX)
    vision_path(loaded, library=False)
    engine.draft_many([(images[0], CTX)], GenerationOptions(constrained=False, max_new_tokens=4))
    engine.probe(images[0], CTX)
    engine.shared_prefix = True
    engine.probe(images[0], CTX)
    engine.shared_prefix = False
    warm_static = 0.0
    if static is not None:
        # Compile the decode step and record its graphs for a full batch and a single row at the run's cache
        # length, through the batcher's thread as in the timed phase (CUDA graph trees are per thread); the
        # batcher's other batch sizes are rounded to powers of two and compile on first use.
        start = time.perf_counter()
        full = min(args.batch_size, n)
        run_threads(full, full, float("inf"), lambda i: static.draft(images[i], CTX, exact).completion_tokens)
        static.draft(images[0], CTX, exact)
        sync(device)
        warm_static = time.perf_counter() - start
        print(f"static cache warm-up (compile: {static.compile_decode}): {warm_static:.1f}s", flush=True)
    sync(device)

    rows: list[Row] = []
    remaining = lambda: hard_deadline - time.perf_counter()  # noqa: E731

    # 1. the seed's way: one generate per study, sequentially
    vision_path(loaded, library=True)
    reset_peak(device)
    seed_deadline = time.perf_counter() + min(args.seed_limit, remaining() * 0.3) if "seed" in phases else 0.0
    start, done, tokens = time.perf_counter(), 0, []
    for i in range(n):
        if time.perf_counter() > seed_deadline:
            break
        try:
            tokens.append(seed_way(loaded, prompt, images[i], args.new_tokens))
        except Exception as exc:  # noqa: BLE001 - keep the other phases
            print(f"  seed's way failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            break
        done += 1
    sync(device)
    seed_s = time.perf_counter() - start
    seed_rate = done / seed_s * 3600 if done else 0.0
    if "seed" in phases:
        rows.append(Row("seed: 1 generate per study", done, n, seed_s, seed_rate, "studies/h", peak_gib(device),
                        f"{set(tokens)} new tokens"))
        print(f"seed's way: {done} studies in {seed_s:.1f}s", flush=True)

    # 2. through the batcher: many threads, one model thread (dynamic cache; then static with --static-cache)
    threads = args.threads or 2 * args.batch_size
    drafters = [("dynamic cache", dynamic)] if "dynamic" in phases else []
    if static is not None and "static" in phases:
        drafters.append(("static cache" + (", compiled" if static.compile_decode else ""), static))
    batch_rates: dict[str, float] = {}
    vision_path(loaded, library=False)
    for k, (label, eng) in enumerate(drafters):
        reset_peak(device)
        first_batch = len(eng._batcher.batch_sizes)
        share = (remaining() - (2 * args.probe_limit if "probes" in phases else 0) - 15) / (len(drafters) - k)
        batch_deadline = time.perf_counter() + max(10.0, share)
        done, batch_s, counts = run_threads(
            n, threads, batch_deadline, lambda i, e=eng: e.draft(images[i], CTX, exact).completion_tokens
        )
        sync(device)
        batch_rates[label] = done / batch_s * 3600 if done else 0.0
        sizes = eng._batcher.batch_sizes[first_batch:]
        rows.append(
            Row(
                f"batcher: {label}, batch {args.batch_size}",
                done, n, batch_s, batch_rates[label], "studies/h", peak_gib(device),
                f"{set(counts)} new tokens; {threads} threads; batch sizes {sizes[:6]}",
            )  # fmt: skip
        )
        print(f"batched ({label}): {done} studies in {batch_s:.1f}s", flush=True)

    # 3. probes: full rows per question (the former way, baseline) and the shared prefix
    questions = len(engine.prompts.probe_questions(CTX))
    probe_threads = max(2, 2 * args.probe_rows // max(1, questions))
    probe_rates: list[float] = []
    probe_phases = ([("full rows, library vision", False),
                     ("shared prefix, windowed vision", True)] if "probes" in phases else [])
    for k, (label, shared) in enumerate(probe_phases):
        reset_peak(device)
        engine.shared_prefix = shared
        vision_path(loaded, library=not shared)
        probe_deadline = time.perf_counter() + max(5.0, min(args.probe_limit, (remaining() - 5) / (2 - k)))
        done_p, probe_s, _ = run_threads(n, probe_threads, probe_deadline, lambda i: len(engine.probe(images[i], CTX)))
        sync(device)
        probe_rates.append(done_p * questions / probe_s if done_p else 0.0)
        rows.append(
            Row(
                f"probes: {label}",
                done_p, n, probe_s, probe_rates[-1], "questions/s", peak_gib(device),
                f"{questions} q/study, {args.probe_rows} rows/pass; {done_p / probe_s * 3600 if done_p else 0:.0f} studies/h",
            )  # fmt: skip
        )
        print(f"probes ({label}): {done_p} studies in {probe_s:.1f}s", flush=True)
    for eng in (dynamic, static):
        if eng is not None:
            eng.close()

    header = f"{'phase':42} {'studies':>9} {'wall s':>8} {'rate':>12} {'unit':12} {'peak GiB':>9}  note"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r.peak_gib:9.2f}" if r.peak_gib is not None else f"{'-':>9}"
        print(f"{r.name:42} {r.done:>4}/{r.total:<4} {r.seconds:8.1f} {r.rate:12.1f} {r.unit:12} {peak}  {r.note}")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x" if b else "n/a"

    print()
    dynamic_rate = batch_rates.get("dynamic cache", 0.0)
    static_rate = next((rate for label, rate in batch_rates.items() if label.startswith("static")), 0.0)
    if "dynamic" in phases:
        print(f"batched (dynamic cache) / seed's way: {ratio(dynamic_rate, seed_rate)}")
    if static is not None and "static" in phases:
        print(
            f"batched (static cache) / seed's way: {ratio(static_rate, seed_rate)}  (goal >= 25x); "
            f"static / dynamic cache: {ratio(static_rate, dynamic_rate)}; warm-up {warm_static:.0f}s not timed"
        )
    if len(probe_rates) == 2:
        print(f"probes shared prefix / full rows: {ratio(probe_rates[1], probe_rates[0])}  (goal >= 8x)")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

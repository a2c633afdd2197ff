"""A tiny, random-weight Qwen2.5-VL model folder, built offline for tests.

Same architecture and file layout as a real InfiMed / Qwen2.5-VL checkpoint
(config, safetensors, byte-level BPE tokenizer with Qwen's special tokens,
ChatML chat template, image/video processors, generation config), but with
tiny widths and depths so that CPU tests run in seconds. The vision patch
geometry is the real one (patch 14, merge 2, temporal patch 2), so the pixel
budget arithmetic and the image-token counts match production.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Qwen2.5-VL's special tokens, in their real order (ids are assigned in this order after the BPE vocab).
SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: Added tokens that are not special (kept by ``skip_special_tokens``), as in InfiMed-RL's tokenizer.
NORMAL_ADDED_TOKENS: list[str] = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

#: ChatML as Qwen2.5-VL uses it; image items become a vision block, video items likewise.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Training text: radiology words, JSON punctuation and every printable ASCII character.
_CORPUS_LINES: list[str] = [
    "Findings: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "Impression: No acute cardiopulmonary abnormality.",
    "There is a small left pleural effusion with adjacent atelectasis. Mild cardiomegaly.",
    "Right upper lobe consolidation concerning for pneumonia. Pulmonary edema is absent.",
    "Acute intracranial haemorrhage with mass effect and midline shift. Skull fracture.",
    "Free air under the diaphragm. Endotracheal tube tip 3 cm above the carina. Malpositioned line.",
    "Is there a pneumothorax? Answer yes or no. yes no Yes No YES NO",
    "chest x-ray head CT abdomen spine pelvis knee hand shoulder mediastinum hilum rib clavicle",
    '{"findings": [{"text": "small effusion", "anatomy": "left lung", "laterality": "left",'
    ' "presence": "present", "severity": "mild"}], "impression": "effusion", "urgency": "routine"}',
    '{"findings":[],"impression":"normal","urgency":"stat"}',
    "laterality presence severity urgency routine priority stat left right bilateral none",
    "present absent uncertain mild moderate severe normal abnormal patient age sex modality",
    "".join(chr(c) for c in range(32, 127)),
    "0123456789 10 20 30 40 50 60 70 80 90 100 mm cm",
]


def train_tokenizer(vocab_size: int):  # -> Qwen2Tokenizer
    """Train a byte-level BPE like Qwen's and wrap it as the transformers Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS_LINES * 4, trainer=trainer)
    model_json = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = Qwen2TokenizerFast(
        vocab=model_json["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NORMAL_ADDED_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(dest: Path, seed: int = 0, bpe_vocab_size: int = 1000) -> Path:
    """Write a tiny random Qwen2.5-VL model folder to ``dest`` and return it.

    Deterministic for a given seed. The model's vocab is the tokenizer's
    length rounded up to a multiple of 64 (as Qwen pads its embedding), so
    code must not assume ``len(tokenizer) == vocab_size``.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(bpe_vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = (len(tokenizer) + 63) // 64 * 64

    head_dim = 16  # mrope sections must sum to head_dim / 2
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 64 // head_dim,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "rms_norm_eps": 1e-6,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(dest, safe_serialization=True)

    pixels = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}
    image_processor = Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(dest)
    return dest


def write_test_pngs(folder: Path, sizes: list[tuple[int, int]] | None = None, seed: int = 7) -> list[Path]:
    """Real 8-bit grey PNG files (as the renderer writes them) of the given (width, height) sizes."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes or [(320, 288), (256, 352)]):
        y, x = np.mgrid[0:h, 0:w]
        pixels = (128 + 60 * np.sin(x / (11.0 + i)) * np.cos(y / 23.0) + rng.normal(0, 12, (h, w))).clip(0, 255)
        path = folder / f"image{i}.png"
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.tiny_model DEST
    import sys

    print(build_tiny_model(Path(sys.argv[1])))

"""Qwen2.5-VL's vision window attention, one sdpa call per window length instead of one per window.

Qwen2.5-VL's vision tower attends within windows (112 px squares) in all but
four of its layers. With the ``sdpa`` implementation, transformers runs each
window as its own attention call in a Python loop: about 80 windows per
1024-pixel image and layer, some 5,000 small calls per two-image study, each a
kernel launch and its Python around it. The windows of a study come in a few
lengths only (full windows, and the partial ones at an image's right and
bottom edges), so this implementation gathers the windows of each length into
one batch and runs one ``scaled_dot_product_attention`` per length: the same
arithmetic, a handful of calls per layer.

It is registered through transformers' documented ``AttentionInterface`` and
chosen for the vision tower only (the text model keeps ``sdpa``). The vision
attention hands its window boundaries (``cu_seq_lens_q``) only to
implementations that take flash attention's variable-length arguments, which
transformers recognises by ``flash`` in the name; hence :data:`WINDOWED_SDPA`.
``tests/inference/test_vision_attention.py`` pins the result to the library's
own ``sdpa`` path, and ``bench/vision.py`` measures the gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

#: The registered name; ``flash`` in it makes transformers pass the window boundaries (see the module text).
WINDOWED_SDPA = "preread_sdpa_by_window_length_flash_api"


@dataclass(frozen=True)
class LengthGroup:
    """The windows of one length: where they start in the packed sequence."""

    length: int
    count: int
    #: their tokens in the packed sequence, window by window: a slice when the windows lie back to
    #: back (a view, no copy), else the positions to gather
    positions: slice | torch.Tensor


def plan_groups(boundaries: list[int], device: torch.device) -> list[LengthGroup]:
    """Group the windows given by cumulative ``boundaries`` (``cu_seqlens``) by their length."""
    starts_by_length: dict[int, list[int]] = {}
    for begin, end in zip(boundaries[:-1], boundaries[1:]):
        if end > begin:
            starts_by_length.setdefault(end - begin, []).append(begin)
    groups = []
    for length, starts in starts_by_length.items():
        contiguous = all(b - a == length for a, b in zip(starts, starts[1:]))
        if contiguous:
            groups.append(LengthGroup(length, len(starts), slice(starts[0], starts[0] + length * len(starts))))
        else:
            first = torch.tensor(starts, dtype=torch.long, device=device)
            index = (first[:, None] + torch.arange(length, device=device)[None, :]).reshape(-1)
            groups.append(LengthGroup(length, len(starts), index))
    return groups


class _PlanCache:
    """The last plans, by the boundaries tensor they came from.

    A forward pass hands the same two boundary tensors (windows, whole images)
    to every layer; planning once per tensor saves a device-to-host copy and
    the grouping in every layer.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, list[LengthGroup]]] = []

    def groups(self, boundaries: torch.Tensor) -> list[LengthGroup]:
        for tensor, groups in self._entries:
            if tensor is boundaries:
                return groups
        groups = plan_groups([int(b) for b in boundaries.tolist()], boundaries.device)
        self._entries = [*self._entries[-3:], (boundaries, groups)]
        return groups


_plans = _PlanCache()


def windowed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention within each window of ``cu_seq_lens_q``, batched by window length.

    ``query``/``key``/``value`` are ``(1, heads, tokens, head_dim)`` with the
    windows packed back to back; the result is ``(1, tokens, heads, head_dim)``,
    as transformers' implementations return it.
    """
    if query.shape[0] != 1 or attention_mask is not None or cu_seq_lens_q is None:
        raise ValueError(f"{WINDOWED_SDPA} serves Qwen2.5-VL's packed vision windows only")
    _, heads, tokens, head_dim = query.shape
    out = query.new_empty(tokens, heads, value.shape[-1])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim), views
    for group in _plans.groups(cu_seq_lens_q):
        span, where = group.count * group.length, group.positions
        parts = [t[where] if isinstance(where, slice) else t.index_select(0, where) for t in (q, k, v)]
        # (windows, heads, length, dim)
        qb, kb, vb = (p.reshape(group.count, group.length, heads, -1).transpose(1, 2) for p in parts)
        attended = scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout if module.training else 0.0,
                                                scale=scaling, is_causal=False)
        attended = attended.transpose(1, 2).reshape(span, heads, -1)
        if isinstance(where, slice):
            out[where] = attended
        else:
            out.index_copy_(0, where, attended)
    return out.unsqueeze(0), None


def register() -> str:
    """Register :func:`windowed_sdpa_attention` with transformers (idempotent); its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(WINDOWED_SDPA, windowed_sdpa_attention)
    return WINDOWED_SDPA


def use_windowed_vision_attention(model: Any) -> None:
    """Switch ``model``'s vision tower to :data:`WINDOWED_SDPA`; the text model keeps its attention.

    Set on the vision config itself: ``set_attn_implementation`` would take the
    ``flash`` in the name for a flash-attention kernel to fetch from the Hub.
    """
    model.config.vision_config._attn_implementation = register()

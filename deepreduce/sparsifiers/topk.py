"""``topk``: exact top-k by magnitude.

A threshold from a strided sample picks ~10 % more candidates than k in one pass; a
selection of the k largest candidates (:func:`._search.largest`) then keeps exactly k.
Small tensors and pathological inputs (ties, NaNs) take that selection over the whole
tensor.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .._bits import true_positions
from . import SelectContext, register_sparsifier
from ._search import EXACT_BELOW, count_at_least, keep_top, largest, sample_threshold, strided_sample


def _any_parts(part_numels: Sequence[int], config: Mapping[str, Any]) -> bool:
    return True


@register_sparsifier("topk", "exact top-k by magnitude (sampled threshold, then topk of the candidates)",
                     per_part=_any_parts)
def topk(magnitude: torch.Tensor, k: int, ctx: SelectContext) -> torch.Tensor:
    d = magnitude.numel()
    if d <= EXACT_BELOW or k > d // 4:
        return largest(magnitude, k)
    sample, scale = strided_sample(magnitude)
    # Aim ~10 % above k so one pass over the data almost always yields enough candidates:
    # the count above a sampled threshold is off by about sqrt(count * scale); 4 of those
    # on top make a second pass rare.
    want = 1.1 * k + 4 * math.sqrt(k * scale)
    mask = ctx.buffer("mask", d, torch.bool, magnitude.device)  # reused: one comparison pass serves the count and the positions
    for _ in range(3):
        threshold = sample_threshold(sample, scale, want)
        count = count_at_least(magnitude, threshold, mask)
        if k <= count <= 4 * k + 1024:
            return keep_top(true_positions(mask), magnitude, k)
        want = want * 2 if count < k else want / 2
    # Pathological data (ties, NaNs, adversarial layouts): a selection over the whole tensor.
    return largest(magnitude, k)

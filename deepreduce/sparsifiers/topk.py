"""``topk``: exact top-k by magnitude.

A threshold from a strided sample picks ~10 % more candidates than k in one pass;
``torch.topk`` of the candidates then keeps exactly the k largest. Pathological inputs
(ties, NaNs) fall back to ``torch.topk`` of the whole tensor, the reference.
"""

from __future__ import annotations

import math

import torch

from .._bits import true_positions
from . import SelectContext, register_sparsifier
from ._search import EXACT_BELOW, count_at_least, keep_top, sample_threshold, strided_sample


@register_sparsifier("topk", "exact top-k by magnitude (sampled threshold, then topk of the candidates)")
def topk(magnitude: torch.Tensor, k: int, ctx: SelectContext) -> torch.Tensor:
    d = magnitude.numel()
    if d <= EXACT_BELOW or k > d // 4:
        return torch.topk(magnitude, k, sorted=False).indices
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
    # Pathological data (ties, NaNs, adversarial layouts): the reference algorithm.
    return torch.topk(magnitude, k, sorted=False).indices

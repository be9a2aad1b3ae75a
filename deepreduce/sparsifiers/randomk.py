"""``randomk``: k uniformly random positions from the private (seed, step, key) stream."""

from __future__ import annotations

import torch

from . import SelectContext, register_sparsifier


@register_sparsifier("randomk", "k uniformly random positions from the private (seed, step, bucket) stream")
def randomk(magnitude: torch.Tensor, k: int, ctx: SelectContext) -> torch.Tensor:
    d = magnitude.numel()
    gen = ctx.generator(salt=0x52414E44, device=magnitude.device)
    if 2 * k > d:
        return torch.randperm(d, generator=gen, device=magnitude.device)[:k]
    # Draw with replacement and deduplicate: the distinct set of a fixed size is a
    # uniform subset, so a uniform subset of it is uniform too. No O(d) permutation.
    chosen = torch.empty(0, dtype=torch.int64, device=magnitude.device)
    while chosen.numel() < k:
        extra = int(1.2 * (k - chosen.numel())) + 16
        draw = torch.randint(0, d, (extra,), generator=gen, device=magnitude.device)
        chosen = torch.unique(torch.cat([chosen, draw]))
    order = torch.randperm(chosen.numel(), generator=gen, device=magnitude.device)[:k]
    return chosen[order]

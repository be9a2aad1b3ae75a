"""``cyclic``: every ``stride``-th element, the starting offset advancing by one each step
(``stride = round(1 / ratio)``), so every element is sent exactly once every ``stride``
steps, whatever its magnitude.

The positions depend only on the step, which every rank shares, so all ranks send the
same positions and the ``strided`` index codec carries them in 16 bytes (offset and
stride) instead of bits per element. The bytes then go to values: at the same payload
size, with few-bit values (``uniform``), several times more elements travel per step
than with top-k, and no element waits longer than ``stride`` steps. Error feedback
holds each element's updates until its turn.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from . import SelectContext, register_sparsifier


def _stride(numel: int, k: int) -> int:
    return max(1, round(numel / k))


def cyclic_counts(numel: int, k: int, config: Mapping[str, Any]) -> tuple[int, ...]:
    """An offset below ``numel % stride`` keeps one element more than the others; every rank
    knows both counts, so payload sizes are computable ahead (no size exchange)."""
    stride = _stride(numel, k)
    return (numel // stride, -(-numel // stride))


@register_sparsifier("cyclic", "every (1/ratio)-th element, offset advancing each step (all ranks alike); use the strided index codec",
                     counts=cyclic_counts)
def cyclic(magnitude: torch.Tensor, k: int, ctx: SelectContext) -> torch.Tensor:
    d = magnitude.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=magnitude.device)
    stride = _stride(d, k)
    return torch.arange(ctx.step % stride, d, stride, device=magnitude.device)

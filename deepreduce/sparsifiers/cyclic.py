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

import torch

from . import SelectContext, register_sparsifier


@register_sparsifier("cyclic", "every (1/ratio)-th element, offset advancing each step (all ranks alike); use the strided index codec",
                     exact_k=False)
def cyclic(magnitude: torch.Tensor, k: int, ctx: SelectContext) -> torch.Tensor:
    d = magnitude.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=magnitude.device)
    stride = max(1, round(d / k))
    return torch.arange(ctx.step % stride, d, stride, device=magnitude.device)

"""``dgc`` (Deep Gradient Compression): a threshold from a ~1 % sample, corrected until
the count is within a tolerance of k."""

from __future__ import annotations

import torch

from ..options import Option, probability
from .._bits import true_positions
from . import SelectContext, register_sparsifier
from ._search import at_least, count_at_least, sample_threshold, strided_sample


@register_sparsifier(
    "dgc",
    "DGC: threshold from a ~1 % sample, corrected until the count is within a tolerance of k",
    options=(
        Option("sample", float, 0.01, "fraction of elements sampled", check=probability, check_text="must be in (0, 1)"),
        Option("tolerance", float, 0.1, "accepted relative deviation of the count from k", check=probability, check_text="must be in (0, 1)"),
        Option("rounds", int, 3, "correction rounds at most", check=lambda v: v >= 0, check_text="must be >= 0"),
    ),
    exact_k=False,
)
def dgc(magnitude: torch.Tensor, k: int, ctx: SelectContext, sample: float, tolerance: float, rounds: int) -> torch.Tensor:
    d = magnitude.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=magnitude.device)
    picked, scale = strided_sample(magnitude, max(1, int(d * sample)))
    want = float(k)
    threshold_ = sample_threshold(picked, scale, want)
    count = count_at_least(magnitude, threshold_)
    for _ in range(rounds):
        if abs(count - k) <= tolerance * k:
            break
        want = max(1.0, want * k / max(count, 1))
        threshold_ = sample_threshold(picked, scale, want)
        count = count_at_least(magnitude, threshold_)
    return true_positions(at_least(magnitude, threshold_))

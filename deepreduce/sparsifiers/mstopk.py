"""``mstopk`` (MSTopK, MLSys 2021): bracket the k-th magnitude by threshold bisection,
no sort; exactly k elements."""

from __future__ import annotations

import math

import torch

from ..options import Option, positive, probability
from .._bits import true_positions
from . import SelectContext, register_sparsifier
from ._search import at_least, count_at_least, keep_top, sample_threshold, strided_sample


@register_sparsifier(
    "mstopk",
    "MSTopK: bracket the k-th magnitude by threshold bisection, no sort; exactly k elements",
    options=(
        Option("rounds", int, 8, "full-tensor bisection rounds at most (after the sampled bracket)", check=positive, check_text="must be > 0"),
        Option("band", float, 0.01, "stop bisecting when the bracket holds fewer than band*k extra elements", check=probability, check_text="must be in (0, 1)"),
    ),
)
def mstopk(magnitude: torch.Tensor, k: int, ctx: SelectContext, rounds: int, band: float) -> torch.Tensor:
    """Keep everything above the upper threshold of a bracket ``[lo, hi)`` around the k-th
    magnitude and fill up to exactly k from the band between them, in index order.

    The bracket starts from a strided sample (the paper starts from mean/max of the full
    tensor; on a CPU each full pass costs as much as ~1/10 of a sort), then is narrowed by
    bisection with full ``countnonzero`` passes until the band is thin."""
    sample, scale = strided_sample(magnitude)
    slack = 3 * math.sqrt(k) * scale + 0.02 * k
    hi = sample_threshold(sample, scale, max(1.0, k - slack))
    n_hi = count_at_least(magnitude, hi)
    if n_hi > k:  # the sample missed: fall back to the paper's upper end, the maximum
        hi = magnitude.max()
        n_hi = count_at_least(magnitude, hi)
    lo = sample_threshold(sample, scale, k + slack)
    n_lo = count_at_least(magnitude, lo)
    if n_lo < k:  # ... and to zero, which every element passes
        lo, n_lo = torch.zeros_like(hi), magnitude.numel()
    for _ in range(rounds):
        if n_lo - n_hi <= band * k or n_hi == k:
            break
        mid = (lo + hi) / 2
        n_mid = count_at_least(magnitude, mid)
        if n_mid >= k:
            lo, n_lo = mid, n_mid
        else:
            hi, n_hi = mid, n_mid
    if n_hi > k:  # only with ties at the maximum: fall back to an exact choice among them
        return keep_top(true_positions(at_least(magnitude, hi)), magnitude, k)
    candidates = true_positions(at_least(magnitude, lo))
    above = magnitude.index_select(0, candidates) >= hi
    in_band = ~above
    fill = in_band & (torch.cumsum(in_band, 0) <= k - n_hi)
    return candidates[above | fill]

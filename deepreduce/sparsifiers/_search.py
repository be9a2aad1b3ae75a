"""Threshold search shared by the sparsifiers: a strided sample estimates a threshold,
then one or two full passes (``abs() >= t``, ``count_nonzero``, ``nonzero``) pick the
elements, which also keeps them in ascending index order without a sort.

On the CPU the full passes run in numpy on the same memory: its comparison, count and
``flatnonzero`` give the same results as torch's kernels and are several times faster
on one thread (``benchmarks/RESULTS.md``, "CPU time per phase")."""

from __future__ import annotations

import math

import numpy as np
import torch

from .._bits import host_array

SAMPLE_SIZE = 1 << 15  # elements in the strided sample that estimates a threshold
EXACT_BELOW = 1 << 15  # below this size one selection over the whole tensor is as fast as the sampled passes

def strided_sample(magnitude: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, float]:
    """A strided sample of about ``size`` elements (default: ``SAMPLE_SIZE``, at most an
    eighth of the tensor, so the sample's top-k stays cheap beside the full passes) and
    the scale (elements per sample)."""
    if size is None:
        size = min(SAMPLE_SIZE, max(1, magnitude.numel() // 8))
    stride = max(1, magnitude.numel() // size)
    sample = magnitude[::stride]
    return sample, magnitude.numel() / sample.numel()


def largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest of the 1-D ``values``, in no particular order (NaN
    counts as the largest, as in ``torch.topk``). On the CPU numpy's introselect
    (``argpartition``) finds the same set, up to ties, several times faster than
    ``torch.topk`` on one thread."""
    array = host_array(values)
    n = values.numel()
    if array is None or not 0 < k < n:
        return torch.topk(values, k, sorted=False).indices
    return torch.from_numpy(np.argpartition(array, n - k)[n - k :])


def sample_threshold(sample: torch.Tensor, scale: float, count: float) -> torch.Tensor:
    """Threshold above which about ``count`` elements of the full tensor are expected: the
    ``kth`` largest of the sample, NaN if a NaN is among its ``kth`` largest (NaN counts
    as the largest, as in ``torch.topk``). On the CPU numpy partitions the values alone,
    without the positions ``largest`` would find (a per-tensor budget pays this once per
    tensor)."""
    kth = min(sample.numel(), max(1, int(math.ceil(count / scale))))
    array = host_array(sample)
    if array is None:
        return sample.index_select(0, largest(sample, kth)).min()
    ordered = np.partition(array, array.size - kth)  # NaNs go to the end
    value = ordered[-1] if np.isnan(ordered[-1]) else ordered[array.size - kth]
    return torch.tensor(value.item(), dtype=sample.dtype)


def at_least(magnitude: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean mask ``magnitude >= threshold``, written into ``mask`` when given."""
    values, limit = host_array(magnitude), host_array(threshold)
    if values is None or limit is None:
        return torch.ge(magnitude, threshold, out=mask) if mask is not None else magnitude >= threshold
    if mask is None:
        mask = torch.empty(magnitude.shape, dtype=torch.bool)
    np.greater_equal(values, limit, out=mask.numpy())
    return mask


def count_true(mask: torch.Tensor) -> int:
    array = host_array(mask)
    return int(np.count_nonzero(array)) if array is not None else int(torch.count_nonzero(mask))


def count_at_least(magnitude: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Elements ``>= threshold``; with ``mask`` (a bool tensor like ``magnitude``) the
    comparison is written there, so a following :func:`~deepreduce._bits.true_positions` of it needs no second pass."""
    return count_true(at_least(magnitude, threshold, mask))


def keep_top(candidates: torch.Tensor, magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest of ``magnitude[candidates]``, returned in ascending index order."""
    chosen = largest(magnitude.index_select(0, candidates), k)
    keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    keep[chosen] = True
    return torch.masked_select(candidates, keep)

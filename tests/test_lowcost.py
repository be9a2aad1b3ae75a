"""The cheap paths of a compressed step: the one-pass finite check, reused selection
buffers, the batched sum of W payloads, and (below) the size-exchange-free gather."""

from __future__ import annotations

import pickle

import pytest
import torch

import deepreduce as dr
from deepreduce.engine.pipeline import all_finite, sum_in_rank_order
from deepreduce.sparse import SparseGrad
from helpers import bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_isfinite_including_overflowing_sums(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen).to(dtype)
    assert all_finite(x)
    huge = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows; every element is finite
    assert all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[4321] = bad
        assert not all_finite(y)
    y = x.clone()
    y[1], y[2] = float("inf"), -float("inf")
    assert not all_finite(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("world", [1, 2, 5])
def test_batched_sum_is_bitwise_the_per_rank_sum(dtype, world):
    """One index_add_ over all ranks' pairs equals one index_add_ per rank, in rank order."""
    gen = torch.Generator().manual_seed(world)
    numel = 20_000
    accumulate = torch.float32 if dtype == torch.float16 else dtype
    parts = []
    for _ in range(world):
        indices = torch.sort(torch.randperm(numel, generator=gen)[:3000]).values  # overlaps across ranks
        values = (torch.randn(3000, generator=gen) * 10 ** torch.randint(-3, 4, (3000,), generator=gen)).to(dtype)
        parts.append(SparseGrad(indices, values, numel))
    for divisor in (1, world):
        expected = torch.zeros(numel, dtype=accumulate)
        for part in parts:
            values = part.values.to(accumulate)
            expected.index_add_(0, part.indices, values / divisor if divisor != 1 else values)
        got = torch.zeros(numel, dtype=accumulate)
        sum_in_rank_order(got, parts, divisor)
        assert torch.equal(bits(got), bits(expected))


def test_reused_selection_buffers_change_no_payload_and_are_not_pickled():
    gen = torch.Generator().manual_seed(3)
    big, small = torch.randn(600_000, generator=gen), torch.randn(300_000, generator=gen)
    reused = dr.Compressor(0.01)
    payloads = [reused.compress(x, step=0) for x in (big, small, big)]
    for x, payload in zip((big, small, big), payloads):
        assert torch.equal(payload, dr.Compressor(0.01).compress(x, step=0))
    clone = pickle.loads(pickle.dumps(reused))
    assert torch.equal(clone.compress(small, step=0), payloads[1])

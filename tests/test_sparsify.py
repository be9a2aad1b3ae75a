"""Sparsifiers: exactness of topk, MSTopK's exact count and mass, DGC's tolerance, randomk's stream."""

from __future__ import annotations

import pytest
import torch

import deepreduce as dr
from deepreduce.errors import ConfigError
from deepreduce.sparse import SparseGrad
from deepreduce.sparsifiers import SelectContext, sparsify, target_k


def ascending_unique(indices: torch.Tensor) -> bool:
    return indices.numel() < 2 or bool((indices[1:] > indices[:-1]).all())


def l1_of_top(x: torch.Tensor, k: int) -> float:
    return float(torch.topk(x.abs(), k).values.double().sum()) if k else 0.0


@pytest.mark.parametrize("numel", [1, 10, 1000, 40_000, 300_000, 2_000_000])
@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.01, 0.1, 0.3, 1.0])
def test_topk_selects_exactly_the_largest_magnitudes(numel, ratio):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    sg = dr.sparsify(x, ratio, "topk")
    k = target_k(numel, ratio)
    assert sg.k == k and ascending_unique(sg.indices)
    assert torch.equal(sg.values, x[sg.indices])
    if k:
        reference = torch.topk(x.abs(), k).indices
        assert torch.equal(sg.indices, torch.sort(reference).values)


def test_topk_on_real_gradients_matches_torch_topk(real_gradients):
    for g in real_gradients.values():
        for ratio in (0.001, 0.01, 0.1):
            k = target_k(g.numel(), ratio)
            sg = dr.sparsify(g, ratio, "topk")
            assert sg.k == k
            assert float(sg.values.abs().double().sum()) == pytest.approx(l1_of_top(g, k), rel=1e-9)


def test_topk_survives_ties_and_zeros():
    x = torch.zeros(1_000_000)
    x[::1000] = 1.0
    sg = dr.sparsify(x, 0.01, "topk")  # 1000 ones and 9000 ties at zero
    assert sg.k == 10_000 and ascending_unique(sg.indices)
    assert int((sg.values == 1.0).sum()) == 1000


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [50_000, 1_000_000])
def test_topk_with_ties_keeps_a_top_k_set(dtype, numel):
    # Half precision rounds many magnitudes to the same value: any choice among the
    # ties at the k-th magnitude is a top-k, nothing below it may be kept.
    x = torch.randn(numel, generator=torch.Generator().manual_seed(5)).to(dtype)
    for ratio in (0.001, 0.01, 0.1):
        sg = dr.sparsify(x, ratio, "topk")
        k = target_k(numel, ratio)
        outside = torch.ones(numel, dtype=torch.bool)
        outside[sg.indices] = False
        assert sg.k == k and ascending_unique(sg.indices) and torch.equal(sg.values, x[sg.indices])
        assert x[sg.indices].abs().min() >= x[outside].abs().max()


def test_threshold_passes_agree_with_torch_on_every_dtype():
    from deepreduce._bits import true_positions
    from deepreduce.sparsifiers._search import at_least, count_at_least

    base = torch.randn(100_003, generator=torch.Generator().manual_seed(2))
    base[::97] = float("nan")
    base[5::89] = float("inf")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        magnitude = base.to(dtype).abs()
        threshold = torch.tensor(1.5, dtype=dtype)
        expected = magnitude >= threshold
        mask = torch.empty_like(expected)
        assert torch.equal(at_least(magnitude, threshold, mask), expected) and torch.equal(mask, expected)
        assert count_at_least(magnitude, threshold) == int(expected.sum())
        assert torch.equal(true_positions(expected), torch.nonzero(expected).reshape(-1))
        assert true_positions(expected).dtype == torch.int64


def test_mstopk_returns_exactly_k_with_top_k_mass(real_gradients):
    for name, g in real_gradients.items():
        big = g.repeat(max(1, 3_000_000 // g.numel()))  # exercise the sampled bracket on a large bucket
        for x in (g, big):
            for ratio in (0.001, 0.01, 0.1):
                k = target_k(x.numel(), ratio)
                sg = dr.sparsify(x, ratio, "mstopk")
                assert sg.k == k, (name, ratio)
                assert ascending_unique(sg.indices)
                assert torch.equal(sg.values, x[sg.indices])
                mass = float(sg.values.abs().double().sum())
                assert mass >= 0.99 * l1_of_top(x, k), (name, ratio, mass / l1_of_top(x, k))


def test_mstopk_handles_constant_and_tiny_tensors():
    for x in (torch.zeros(500_000), torch.ones(500_000), torch.randn(3)):
        sg = dr.sparsify(x, 0.01, "mstopk")
        assert sg.k == target_k(x.numel(), 0.01) and ascending_unique(sg.indices)


def test_dgc_count_is_within_tolerance(real_gradients):
    for g in real_gradients.values():
        for ratio in (0.001, 0.01, 0.1):
            k = target_k(g.numel(), ratio)
            sg = dr.sparsify(g, ratio, "dgc", tolerance=0.1)
            assert abs(sg.k - k) <= 0.1 * k + 1, (ratio, sg.k, k)
            assert ascending_unique(sg.indices)
            # Everything selected is at least as large as everything left out.
            left_out = torch.ones(g.numel(), dtype=torch.bool)
            left_out[sg.indices] = False
            assert float(sg.values.abs().min()) >= float(g.abs()[left_out].max())


def test_threshold_keeps_every_element_at_or_above_t():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    sg = dr.sparsify(x, 0.5, "threshold", t=2.0)
    assert torch.equal(sg.indices, torch.nonzero(x.abs() >= 2.0).reshape(-1))
    with pytest.raises(ConfigError, match="needs the parameter t"):
        dr.sparsify(x, 0.5, "threshold")
    with pytest.raises(ConfigError, match="must be >= 0"):
        dr.sparsify(x, 0.5, "threshold", t=-1)


def test_randomk_is_a_reproducible_private_stream():
    x = torch.randn(50_000)
    before = torch.random.get_rng_state()
    a = dr.sparsify(x, 0.01, "randomk", ctx=SelectContext(rng_seed=11))
    b = dr.sparsify(x, 0.01, "randomk", ctx=SelectContext(rng_seed=11))
    c = dr.sparsify(x, 0.01, "randomk", ctx=SelectContext(rng_seed=12))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    assert a.k == 500 and ascending_unique(a.indices)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    assert dr.sparsify(x, 0.9, "randomk", ctx=SelectContext(rng_seed=1)).k == 45_000


def test_randomk_is_uniform():
    counts = torch.zeros(100)
    for seed in range(400):
        counts.index_add_(0, dr.sparsify(torch.randn(100), 0.1, "randomk", ctx=SelectContext(seed)).indices, torch.ones(10))
    # 4000 draws over 100 positions: each expects 40; a chi-square bound far in the tail.
    chi2 = float(((counts - 40) ** 2 / 40).sum())
    assert chi2 < 200, chi2


def test_sparse_grad_dense_round_trip():
    sg = SparseGrad(torch.tensor([1, 4]), torch.tensor([2.0, -3.0]), 6)
    assert torch.equal(sg.to_dense(), torch.tensor([0.0, 2.0, 0.0, 0.0, -3.0, 0.0]))
    dense = torch.ones(6)
    sg.add_to(dense, alpha=0.5)
    assert torch.equal(dense, torch.tensor([1.0, 2.0, 1.0, 1.0, -0.5, 1.0]))
    assert sg.k == 2 and sg.density == pytest.approx(1 / 3)


def test_bad_sparsifier_configuration_is_reported():
    with pytest.raises(ConfigError, match="unknown sparsifier 'top'"):
        dr.sparsify(torch.randn(10), 0.1, "top")
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\]"):
        dr.sparsify(torch.randn(10), 1.5)
    with pytest.raises(ConfigError, match="unknown option"):
        dr.sparsify(torch.randn(10), 0.1, "topk", rounds=3)


def test_cyclic_sends_every_element_once_per_stride_steps():
    x = torch.randn(1003)
    seen = torch.zeros(1003, dtype=torch.int64)
    for step in range(10):
        chosen = sparsify(x, 0.1, "cyclic", SelectContext(step=step)).indices
        assert bool((chosen % 10 == step % 10).all()) and chosen.numel() in (100, 101)
        seen[chosen] += 1
    assert bool((seen == 1).all())
    assert sparsify(x, 0.0, "cyclic").k == 0 and sparsify(x, 1.0, "cyclic").k == 1003


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sample_threshold_is_the_smallest_of_the_sample_top(dtype):
    # numpy's partition of the values on the CPU gives the threshold torch's top-k set
    # gives: ties, infinities and NaN (the largest) included, strided samples too.
    from deepreduce.sparsifiers._search import sample_threshold

    gen = torch.Generator().manual_seed(4)
    base = torch.randint(-40, 40, (999,), generator=gen).to(dtype)  # many ties
    with_nan = base.clone()
    with_nan[::97] = float("nan")
    with_inf = base.clone()
    with_inf[::50] = float("inf")
    for values in (base, with_nan, with_inf, base[::3], with_nan[1::4]):
        for count in (1, 9, 200, values.numel(), 10 * values.numel()):
            kth = min(values.numel(), max(1, count))
            want = torch.topk(values, kth).values.min()
            got = sample_threshold(values, 1.0, count)
            assert got.dtype == dtype and got.dim() == 0
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert sample_threshold(base, 4.0, 40).item() == torch.topk(base, 10).values.min().item()  # count / scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_largest_finds_the_set_torch_topk_finds(dtype):
    # numpy's argpartition on the CPU (bfloat16: torch.topk): the same set where values
    # are distinct, NaN counted as the largest, k = 0 and k = n included.
    from deepreduce.sparsifiers._search import largest

    gen = torch.Generator().manual_seed(3)
    values = torch.randperm(250, generator=gen).to(dtype)  # integers below 256: distinct in every dtype
    values[::31] = float("nan")
    for k in (0, 1, 7, 150, 249, 250):
        got = largest(values, k)
        assert got.dtype == torch.int64 and got.numel() == k
        assert got.unique().numel() == k
        expected = torch.topk(values, k, sorted=False).values
        # the same values (NaNs are ties among themselves: which NaN is kept may differ)
        torch.testing.assert_close(torch.sort(values[got]).values, torch.sort(expected).values, rtol=0, atol=0, equal_nan=True)
    strided = values[::3]
    torch.testing.assert_close(torch.sort(strided[largest(strided, 40)]).values, torch.sort(torch.topk(strided, 40).values).values,
                               rtol=0, atol=0, equal_nan=True)

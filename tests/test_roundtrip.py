"""Property tests: every lossless codec round-trips exactly, lossy value codecs stay within their rounding."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deepreduce as dr
from deepreduce.codecs import INDEX_CODECS, VALUE_CODECS

from helpers import bits, pack_parts

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Codecs that carry any ascending index set (strided carries only evenly spaced ones: tested below).
LOSSLESS_INDEX = [n for n in dr.index_codecs() if INDEX_CODECS.lookup(n).lossless and INDEX_CODECS.lookup(n).general]
LOSSLESS_VALUE = [n for n in dr.value_codecs() if VALUE_CODECS.lookup(n).lossless]
ROUNDING = {"fp16": 2.0**-11, "bf16": 2.0**-8}  # unit roundoff of the target format

sizes = st.one_of(st.integers(1, 64), st.integers(1, 5000), st.integers(1, 10**6))
densities = st.one_of(st.sampled_from([0.0, 1e-3, 1e-2, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0))
layouts = st.sampled_from(["scattered", "clustered", "edges"])


def make_indices(numel: int, density: float, layout: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(numel, int(round(density * numel)))
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if layout == "scattered" or k == numel:
        return torch.sort(torch.randperm(numel, generator=gen)[:k]).values
    if layout == "edges":  # first and last positions, the extremes a codec must reach
        half = k // 2
        return torch.cat([torch.arange(half), torch.arange(numel - (k - half), numel)])
    # Clustered: runs of random length, as when whole rows or channels are selected.
    runs = max(1, k // 16)
    while True:
        starts = torch.randint(0, numel, (runs,), generator=gen)
        stops = (starts + torch.randint(1, 64, (runs,), generator=gen)).clamp(max=numel)
        edges = torch.zeros(numel + 1, dtype=torch.int64)
        edges.index_add_(0, starts, torch.ones(runs, dtype=torch.int64))
        edges.index_add_(0, stops, -torch.ones(runs, dtype=torch.int64))
        selected = torch.nonzero(torch.cumsum(edges[:-1], 0) > 0).reshape(-1)
        if selected.numel() >= k:
            return selected[:k]
        runs *= 2


def make_values(k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    scale = torch.exp2(torch.randint(-20, 4, (k,), generator=gen).double())
    values = (torch.randn(k, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if k >= 3:
        values[0], values[1] = 0.0, -0.0  # signed zeros must survive bit-exact codecs
    return values


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(numel=sizes, density=densities, layout=layouts, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
@pytest.mark.parametrize("index", LOSSLESS_INDEX)
def test_lossless_index_codecs_round_trip_exactly(index, numel, density, layout, dtype, seed):
    indices = make_indices(numel, density, layout, seed)
    values = make_values(indices.numel(), dtype, seed)
    payload, _ = pack_parts(indices, values, numel, index=index)
    decoded = dr.decode(payload)
    assert decoded.numel == numel
    assert torch.equal(decoded.indices, indices)
    assert torch.equal(bits(decoded.values), bits(values))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(numel=sizes, density=densities, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
@pytest.mark.parametrize("value", LOSSLESS_VALUE)
def test_lossless_value_codecs_are_bit_exact(value, numel, density, dtype, seed):
    indices = make_indices(numel, density, "scattered", seed)
    values = make_values(indices.numel(), dtype, seed)
    payload, _ = pack_parts(indices, values, numel, index="eliasfano", value=value)
    decoded = dr.decode(payload)
    assert torch.equal(decoded.indices, indices)
    assert decoded.values.dtype == dtype
    assert torch.equal(bits(decoded.values), bits(values))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(numel=sizes, density=densities, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
@pytest.mark.parametrize("value", sorted(ROUNDING))
def test_half_precision_value_codecs_stay_within_rounding(value, numel, density, dtype, seed):
    indices = make_indices(numel, density, "scattered", seed)
    values = make_values(indices.numel(), dtype, seed)
    payload, _ = pack_parts(indices, values, numel, value=value)
    decoded = dr.decode(payload)
    assert torch.equal(decoded.indices, indices)
    assert decoded.values.dtype == dtype
    exact, got = values.double(), decoded.values.double()
    # Relative rounding of the target format, plus the target's (or the input's own)
    # rounding when the result is cast back to a narrower input dtype.
    unit = ROUNDING[value] + (2.0**-8 if dtype == torch.bfloat16 else 2.0**-11 if dtype == torch.float16 else 0.0)
    floor = exact.abs().max().item() * 2.0**-24 if exact.numel() else 0.0  # fp16 subnormals after scaling
    assert bool(((got - exact).abs() <= unit * exact.abs() + floor).all())
    assert bool((torch.sign(got) == torch.sign(exact)).logical_or(got == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fp16_codec_scales_instead_of_overflowing(dtype):
    big = torch.tensor([1e6, -3e5, 70000.0, 1.0], dtype=torch.float64).to(dtype)
    tiny = torch.tensor([3e-9, -1e-8, 2e-9], dtype=torch.float64).to(dtype)
    for values in (big, tiny):
        payload, _ = pack_parts(torch.arange(values.numel()), values, 10, value="fp16")
        got = dr.decode(payload).values.double()
        assert torch.isfinite(got).all()
        assert torch.allclose(got, values.double(), rtol=2e-3, atol=0)


def test_fp16_codec_keeps_non_finite_values():
    values = torch.tensor([1.0, float("inf"), float("-inf"), float("nan"), -2.5])
    payload, _ = pack_parts(torch.arange(5), values, 5, value="fp16")
    got = dr.decode(payload).values
    assert got[0] == 1.0 and got[4] == -2.5
    assert got[1] == float("inf") and got[2] == float("-inf") and torch.isnan(got[3])


@pytest.mark.parametrize("index", dr.index_codecs())
@pytest.mark.parametrize("value", dr.value_codecs())
def test_every_codec_pair_handles_empty_and_full_selection(index, value):
    x = torch.randn(777)
    for ratio in (0.0, 1.0):
        c = dr.Compressor(ratio, "topk", index, value)
        result = c.compress_detailed(x)
        decoded = dr.decode(result.payload)
        assert torch.equal(decoded.indices, result.sent.indices)
        assert torch.equal(bits(decoded.values), bits(result.sent.values))
        if ratio == 0.0 and INDEX_CODECS.lookup(index).lossless:
            assert decoded.k == 0
        if ratio == 1.0 and INDEX_CODECS.lookup(index).lossless:
            assert torch.equal(decoded.indices, torch.arange(777))


def test_empty_tensor_round_trips():
    for index in LOSSLESS_INDEX:
        payload = dr.Compressor(0.5, "topk", index, "raw").compress(torch.empty(0))
        decoded = dr.decode(payload)
        assert decoded.numel == 0 and decoded.k == 0


def test_large_tensors_use_64_bit_raw_indices():
    # The raw codec switches to int64 at 2^31 elements; checked on the header logic
    # with a sparse set (no dense tensor of that size is allocated).
    numel = 2**31 + 5
    indices = torch.tensor([0, 7, 2**31 + 4])
    values = torch.tensor([1.0, -2.0, 3.0])
    for index in LOSSLESS_INDEX:
        payload, _ = pack_parts(indices, values, numel, index=index)
        decoded = dr.decode(payload)
        assert torch.equal(decoded.indices, indices), index


def test_eliasfano_is_within_ten_percent_of_the_entropy_bound():
    numel = 10**6
    gen = torch.Generator().manual_seed(7)
    for density in (1e-3, 1e-2, 1e-1):
        k = int(density * numel)
        indices = torch.sort(torch.randperm(numel, generator=gen)[:k]).values
        payload, part = pack_parts(indices, torch.zeros(k), numel, index="eliasfano")
        index_bits = 8 * (part.data.numel() + len(part.params))
        bound = (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2)
        assert index_bits <= 1.10 * bound, (density, index_bits / bound)
        assert index_bits >= bound * 0.999  # no codec beats the bound: guards the measurement itself


@pytest.mark.parametrize("k", [1, 37, 5_000, 70_000])
def test_eliasfano_picks_the_cheapest_low_width_near_the_guess(k):
    # Small and large payloads take different code paths to the same choice: the width
    # that minimises k*l + sum(gap >> l) among guess-2 .. guess+2, the first on ties.
    from deepreduce.codecs.index.eliasfano import best_low_width, gaps_of, guess_low_width

    numel = 3_000_000
    gen = torch.Generator().manual_seed(k)
    clustered = torch.randint(0, numel // 50, (k,), generator=gen) * torch.randint(1, 50, (k,), generator=gen)
    for indices in (torch.randperm(numel, generator=gen)[:k], clustered):
        gaps = gaps_of(torch.unique(indices))
        guess = guess_low_width(numel, gaps.numel())
        widths = range(max(0, guess - 2), min(guess + 3, 63))
        costs = [int((gaps >> l).sum()) + gaps.numel() * l for l in widths]
        assert best_low_width(gaps, numel) == widths[costs.index(min(costs))]
        assert best_low_width(gaps.numpy(), numel) == widths[costs.index(min(costs))]  # the CPU path's arrays


@given(numel=st.integers(1, 10**6), ratio=st.floats(1e-4, 1.0), step=st.integers(0, 10**4))
@settings(max_examples=60, deadline=None)
def test_cyclic_selection_round_trips_through_the_strided_codec(numel, ratio, step):
    """Offset and stride carry the whole index set: 64 header + 16 parameter bytes, no index part."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    result = dr.Compressor(ratio, "cyclic", "strided", "raw").compress_detailed(x, step=step)
    decoded = dr.decode(result.payload)
    assert torch.equal(decoded.indices, result.sent.indices) and torch.equal(decoded.values, x[decoded.indices])
    assert dr.read_header(result.payload).index_nbytes == 0
    assert result.payload.numel() == 64 + 16 + 4 * decoded.k


def test_strided_codec_refuses_other_index_sets_and_bad_parameters():
    # A sparsifier whose sets the codec cannot carry is refused when the compressor is built...
    for spec in ("topk:0.1/strided/raw", "randomk:0.05/strided/fp16", "topk:0.05/blocks/fp16", "mstopk:0.05/blocks/fp16"):
        with pytest.raises(dr.ConfigError, match="carries only the index sets of the (cyclic|blocktopk) sparsifier"):
            dr.Compressor.from_spec(spec)
    # ... every element is evenly spaced and whole blocks, whatever selects it
    for spec in ("topk:1/strided/raw", "topk:1/blocks/raw"):
        x = torch.randn(1000)
        decoded = dr.decode(dr.Compressor.from_spec(spec).compress(x))
        assert torch.equal(decoded.indices, torch.arange(1000)) and torch.equal(decoded.values, x)
    # ... and the codec itself still checks what it is handed
    from deepreduce.codecs import CodecContext, make_index_codec

    with pytest.raises(dr.ConfigError, match="evenly spaced indices only"):
        make_index_codec("strided").encode(torch.tensor([1, 2, 5]), CodecContext(1000, torch.float32, torch.device("cpu")))
    good = dr.Compressor(0.1, "cyclic", "strided", "raw").compress(torch.randn(1000), step=3)
    from helpers import reseal

    for offset, stride, match in ((0, 0, "stride 0 must be >= 1"), (995, 10, "exceed numel=1000")):
        bad = good.clone()
        bad[64:80] = torch.frombuffer(bytearray(struct.pack("<QQ", offset, stride)), dtype=torch.uint8)
        with pytest.raises(dr.DecodeError, match=match):
            dr.decode(reseal(bad))

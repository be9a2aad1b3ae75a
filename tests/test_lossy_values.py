"""Lossy value codecs: qsgd (unbiased, sized as the formula says), polyfit and dexp
(signs and order kept, error on real gradients), and their validation."""

from __future__ import annotations

import functools
import math
import struct

import pytest
import torch

import deepreduce as dr
from deepreduce import _bits
from deepreduce.codecs import CodecContext, make_value_codec
from deepreduce.codecs import _sorted_curves
from deepreduce.codecs.value.dexp import DoubleExponentialValueCodec, fit_double_exponential
from deepreduce.codecs.value.polyfit import PolyFitValueCodec
from deepreduce.codecs.value.qsgd import QSGDValueCodec

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CURVES = ["polyfit", "dexp", "dexp:segments=single", "polyfit:degree=2"]


def _ctx(dtype=torch.float32, seed=0, numel=10**6):
    return CodecContext(numel, dtype, torch.device("cpu"), seed)


def _codec(spec: str):
    name, _, rest = spec.partition(":")
    params = dict(kv.split("=") for kv in rest.split(",")) if rest else {}
    return make_value_codec(name, params)


def _round_trip(spec: str, values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
    codec = _codec(spec)
    ctx = _ctx(values.dtype, seed)
    enc = codec.encode(values, ctx)
    decoded = type(codec).decode(enc.data, enc.params, values.numel(), ctx)
    assert decoded.dtype == values.dtype and decoded.shape == values.shape
    return decoded, enc.data.numel()


def _heavy_tailed(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, generator=gen, dtype=torch.float64) * torch.rand(k, generator=gen, dtype=torch.float64) ** 3


@functools.lru_cache(maxsize=1)
def _real_gradient() -> torch.Tensor:
    from deepreduce.apps.data import stdlib_corpus
    from deepreduce.apps.models import ByteTransformer

    torch.manual_seed(0)
    corpus = stdlib_corpus(max_bytes=1 << 20)
    model = ByteTransformer(d_model=64, n_layers=2, n_heads=4, seq_len=64)
    x, y = corpus.batch("train", 8, 64, torch.Generator().manual_seed(0))
    model.loss(x, y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# --- qsgd ----------------------------------------------------------------------------------


def test_qsgd_is_unbiased_across_steps_and_seeds():
    x = _heavy_tailed(20_000, 1).float()
    draws, errors = [], []
    for seed in (0, 1):
        c = dr.Compressor(0.1, "topk", "eliasfano", "qsgd", seed=seed)
        for step in range(150):
            out = c.compress_detailed(x, step=step)
            draws.append(out.sent.values.double())
    v = x[out.sent.indices].double()
    for d in draws:
        errors.append(((d - v).norm() / v.norm()).item())
    mean_error = sum(errors) / len(errors)
    assert 0.01 < mean_error < 0.2  # it is lossy, but not wildly
    bias = ((torch.stack(draws).mean(0) - v).norm() / v.norm()).item()
    assert bias < 3 * mean_error / math.sqrt(len(draws))
    # Per element: each draw is one of two neighbouring levels norm*l/s, so the mean of n
    # draws lies within a few (spacing / 2) / sqrt(n) of the truth.
    norms = torch.linalg.vector_norm(torch.nn.functional.pad(v, (0, -v.numel() % 512)).reshape(-1, 512), dim=1)
    spacing = norms.repeat_interleave(512)[: v.numel()] / 127
    tolerance = 5 * spacing / 2 / math.sqrt(len(draws)) + 1e-6 * v.abs()
    assert bool(((torch.stack(draws).mean(0) - v).abs() <= tolerance).all())


def test_qsgd_seeds_and_steps_give_independent_draws():
    x = _heavy_tailed(5000, 2).float()
    a = dr.Compressor(0.2, "topk", "eliasfano", "qsgd", seed=1)
    b = dr.Compressor(0.2, "topk", "eliasfano", "qsgd", seed=2)
    assert torch.equal(a.compress(x, step=0), dr.Compressor(0.2, "topk", "eliasfano", "qsgd", seed=1).compress(x, step=0))
    assert not torch.equal(a.compress_detailed(x, step=0).sent.values, b.compress_detailed(x, step=0).sent.values)
    assert not torch.equal(a.compress_detailed(x, step=0).sent.values, a.compress_detailed(x, step=1).sent.values)


@pytest.mark.parametrize("k,params", [(1000, {}), (5000, {"bits": 4}), (3000, {"s": 3, "block": 64}), (20000, {"s": 1000, "block": 2048}), (777, {"bits": 2})])
def test_qsgd_payload_matches_the_formula(k, params):
    codec = QSGDValueCodec(**params)
    s, bucket = codec.levels, codec.config["block"]
    enc = codec.encode(_heavy_tailed(k).float(), _ctx())
    predicted_bits = k * (math.ceil(math.log2(s + 1)) + 1) + 32 * math.ceil(k / bucket)
    assert abs(8 * enc.data.numel() - predicted_bits) <= 0.05 * predicted_bits


def test_qsgd_parameters():
    assert QSGDValueCodec(bits=8).levels == 127 and QSGDValueCodec(bits=4).levels == 7
    assert QSGDValueCodec().levels == 127
    with pytest.raises(dr.ConfigError):
        QSGDValueCodec(bits=4, s=127)
    with pytest.raises(dr.ConfigError):
        QSGDValueCodec(bits=1)
    with pytest.raises(dr.ConfigError):
        QSGDValueCodec(block=0)
    assert dr.Compressor.from_spec("topk:0.1/eliasfano/qsgd:bits=4").value_codec.levels == 7


@pytest.mark.parametrize("dtype", DTYPES)
def test_qsgd_dtypes_and_extremes(dtype):
    values = _heavy_tailed(1500, 3).to(dtype)
    decoded, _ = _round_trip("qsgd", values)
    norms = torch.linalg.vector_norm(torch.nn.functional.pad(values.double(), (0, -1500 % 512)).reshape(-1, 512), dim=1)
    assert bool((decoded.double().abs() <= norms.repeat_interleave(512)[:1500] * 1.01).all())  # a level is at most the norm
    assert bool((torch.sign(decoded) * torch.sign(values) >= 0).all())  # never the wrong sign
    zeros, _ = _round_trip("qsgd", torch.zeros(100, dtype=dtype))
    assert bool((zeros == 0).all())
    poisoned = values.clone()
    poisoned[700] = float("inf")
    decoded, _ = _round_trip("qsgd:block=512", poisoned)
    assert not bool(torch.isfinite(decoded[512:1024]).all()) and bool(torch.isfinite(decoded[:512]).all())


# --- polyfit and dexp -------------------------------------------------------------------


def _assert_signs_and_order(decoded: torch.Tensor, values: torch.Tensor) -> None:
    decoded, values = decoded.double(), values.double()
    assert torch.equal(torch.sign(decoded), torch.sign(values))
    for sign in (1, -1):
        part = torch.sign(values) == sign
        if not bool(part.any()):
            continue
        true, got = values[part].abs(), decoded[part].abs()
        order = torch.argsort(true, descending=True, stable=True)
        true, got = true[order], got[order]
        # Strictly larger true magnitude never decodes smaller (ties may go either way).
        larger = true[:-1] > true[1:]
        assert bool((got[:-1][larger] >= got[1:][larger]).all())
        assert bool((got <= true.max()).all()) and bool((got >= true.min()).all())


@pytest.mark.parametrize("spec", CURVES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_curves_keep_signs_and_order(spec, dtype):
    values = _heavy_tailed(6000, 4)
    values[::50] = 0.0
    values = values.to(dtype)
    decoded, nbytes = _round_trip(spec, values)
    _assert_signs_and_order(decoded, values)
    assert bool((decoded[::50] == 0).all())
    error = ((decoded.double() - values.double()).norm() / values.double().norm()).item()
    assert error < (0.5 if "single" in spec else 0.15)
    # The permutation is counted: ceil(log2 k) bits per value.
    assert nbytes >= 6000 * math.ceil(math.log2(6000)) / 8


@pytest.mark.parametrize("spec", CURVES)
@pytest.mark.parametrize(
    "values",
    [[], [1.5], [-2.0], [0.0], [3.0, -3.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1e-30, 2e-30, -5e-31], list(range(1, 40)), [-float(i) for i in range(200)], [1e300, -1e-300, 5.0]],
)
def test_curves_small_and_degenerate_inputs(spec, values):
    tensor = torch.tensor(values, dtype=torch.float64)
    decoded, _ = _round_trip(spec, tensor)
    _assert_signs_and_order(decoded, tensor)
    if len(set(values)) <= 2 and 0.0 not in values:
        # One value per sign part: the [min, max] clamp makes it exact.
        assert torch.equal(decoded, tensor)


@pytest.mark.parametrize("spec", CURVES)
def test_curves_propagate_non_finite_input(spec):
    values = _heavy_tailed(100).float()
    values[5] = float("nan")
    decoded, nbytes = _round_trip(spec, values)
    assert nbytes == 0 and bool(torch.isnan(decoded).all())


def test_double_exponential_fit_recovers_its_own_curve():
    t = torch.linspace(0, 1, 2000, dtype=torch.float64)
    y = 0.3 * torch.exp(4.0 * t) + 2.0 * torch.exp(-1.5 * t)
    a, b, c, d = fit_double_exponential(y, t).tolist()
    fitted = a * torch.exp(b * t) + c * torch.exp(d * t)
    assert ((fitted - y).norm() / y.norm()).item() < 1e-3
    assert sorted([b, d]) == pytest.approx([-1.5, 4.0], rel=0.05)


@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_relative_error_on_real_top_k_gradients(ratio):
    g = _real_gradient()
    errors = {}
    for value in ("polyfit", "dexp", "qsgd"):
        out = dr.Compressor(ratio, "topk", "eliasfano", value).compress_detailed(g, step=0)
        true = g[out.sent.indices]
        _assert_signs_and_order(out.sent.values, true) if value != "qsgd" else None
        errors[value] = ((out.sent.values - true).norm() / true.norm()).item()
    print(f"relative error at density {ratio} on {g.numel()} gradient elements: {errors}")
    assert errors["polyfit"] < 0.12 and errors["dexp"] < 0.15 and errors["qsgd"] < 0.15


# --- validation --------------------------------------------------------------------------


def test_permutation_packing():
    for k in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025):
        order = torch.randperm(k)
        data = _sorted_curves.pack_permutation(order)
        assert data.numel() == _sorted_curves.permutation_nbytes(k) and 8 * data.numel() >= k * max(0, math.ceil(math.log2(max(k, 1))))
        assert torch.equal(_sorted_curves.unpack_permutation(data, k, "test"), order)
    bad = torch.arange(10)
    bad[3] = 4  # a repeat
    with pytest.raises(dr.DecodeError):
        _sorted_curves.unpack_permutation(_sorted_curves.pack_permutation(bad), 10, "test")
    with pytest.raises(dr.DecodeError):  # 10 needs 4 bits, which can also say 15
        _sorted_curves.unpack_permutation(_sorted_curves.pack_permutation(torch.tensor([15, 1, 2, 3, 4, 5, 6, 7, 8, 9])), 10, "test")


@pytest.mark.parametrize("cls", [PolyFitValueCodec, DoubleExponentialValueCodec])
def test_curve_decoders_reject_inconsistent_fields(cls):
    codec = cls()
    values = _heavy_tailed(500).float()
    ctx = _ctx()
    enc = codec.encode(values, ctx)
    arg, flags, n_pos, n_zero, segs_pos, segs_neg = struct.unpack("<BBQQHH", enc.params)
    nsegs = segs_pos + segs_neg
    bad_params = [
        struct.pack("<BBQQHH", arg, 2, n_pos, n_zero, segs_pos, segs_neg),
        struct.pack("<BBQQHH", arg, 1, n_pos, n_zero, segs_pos, segs_neg),
        struct.pack("<BBQQHH", 99, flags, n_pos, n_zero, segs_pos, segs_neg),
        struct.pack("<BBQQHH", arg, flags, n_pos + 1, n_zero, segs_pos, segs_neg),
        struct.pack("<BBQQHH", arg, flags, 600, 0, segs_pos, segs_neg),
        struct.pack("<BBQQHH", arg, flags, n_pos, n_zero, 0, segs_neg),
        struct.pack("<BBQQHH", arg, flags, n_pos, n_zero, segs_pos, 300),
        enc.params[:-1],
    ]
    for params in bad_params:
        with pytest.raises(dr.DecodeError):
            cls.decode(enc.data, params, 500, ctx)
    data = enc.data.clone()
    ncoef = cls.coefficient_count(arg)
    corrupt = []
    for mutate in (
        lambda s, b, c: s.__setitem__(0, s[0] + 1),  # sizes no longer add up
        lambda s, b, c: s.__setitem__(0, 1 << 62),  # a size beyond k
        lambda s, b, c: b.__setitem__(0, -1.0),  # negative magnitude bound
        lambda s, b, c: b.__setitem__(1, float("inf")),
        lambda s, b, c: b.__setitem__(0, b[1] * 2),  # min above max
        lambda s, b, c: c.__setitem__(0, float("nan")),
    ):
        copy = data.clone()
        s = copy[: 8 * nsegs].view(torch.int64)
        b = copy[8 * nsegs : 8 * nsegs + 32].view(torch.float64)
        c = copy[8 * nsegs + 32 : 8 * nsegs + 32 + 8 * nsegs * ncoef].view(torch.float64)
        mutate(s, b, c)
        corrupt.append(copy)
    corrupt += [data[:-1], torch.cat([data, data[:4]])]
    for bad in corrupt:
        with pytest.raises(dr.DecodeError):
            cls.decode(bad, enc.params, 500, ctx)


def test_dexp_rejects_huge_exponents():
    enc = DoubleExponentialValueCodec(segments="single").encode(_heavy_tailed(300).float(), _ctx())
    data = enc.data.clone()
    data[16 + 32 : 16 + 32 + 32].view(torch.float64)[1] = 1e6
    with pytest.raises(dr.DecodeError):
        DoubleExponentialValueCodec.decode(data, enc.params, 300, _ctx())


def test_qsgd_decoder_rejects_inconsistent_fields():
    codec = QSGDValueCodec(s=5, block=100)
    enc = codec.encode(_heavy_tailed(1000).float(), _ctx())
    for params in (struct.pack("<II", 0, 100), struct.pack("<II", 5, 0), struct.pack("<II", 5, 99), struct.pack("<II", 8, 100), struct.pack("<II", 5, (1 << 31) - 1), b"\0"):
        with pytest.raises(dr.DecodeError):
            QSGDValueCodec.decode(enc.data, params, 1000, _ctx())
    negative = enc.data.clone()
    negative[:4].view(torch.float32)[0] = -1.0
    too_high = enc.data.clone()
    too_high[40:] = 255  # levels 7 > s = 5
    for data in (negative, too_high, enc.data[:-1]):
        with pytest.raises(dr.DecodeError):
            QSGDValueCodec.decode(data, enc.params, 1000, _ctx())




# --- uniform --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("block", [1, 7, 128])
def test_uniform_error_is_bounded_by_half_a_step_and_by_the_values(bits, block):
    values = _heavy_tailed(1000).float()
    codec = make_value_codec("uniform", {"bits": bits, "block": block})
    ctx = _ctx()
    enc = codec.encode(values, ctx)
    decoded = codec.decode(enc.data, enc.params, values.numel(), ctx)
    nblocks = -(-1000 // block)
    assert enc.data.numel() == 4 * nblocks * (1 if bits == 1 else 2) + _bits.fixed_nbytes(1000, bits)
    assert torch.equal(torch.signbit(decoded), torch.signbit(values))
    blocks = torch.arange(1000) // block
    magnitude = values.abs()
    if bits == 1:  # sign times the block's mean magnitude
        means = torch.zeros(nblocks, dtype=torch.float64).index_add_(0, blocks, magnitude.double()) / torch.bincount(blocks)
        assert torch.allclose(decoded.abs().double(), means[blocks], rtol=1e-6)
    else:
        low = torch.full((nblocks,), float("inf")).scatter_reduce(0, blocks, magnitude, "amin")
        high = torch.zeros(nblocks).scatter_reduce(0, blocks, magnitude, "amax")
        half_step = (high - low)[blocks] / (2 * (2 ** (bits - 1) - 1))
        assert bool(((decoded - values).abs() <= half_step + high[blocks] * 2.0**-22).all())  # + fp32 rounding
        # no element is further off than its own value
        assert bool(((decoded - values).abs() <= magnitude * (1 + 2.0**-20) + high[blocks] * 2.0**-22).all())
    # the error is smaller than the values: error feedback stays bounded
    assert torch.linalg.vector_norm(decoded - values) < torch.linalg.vector_norm(values)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block", [7, 128, 5000])
def test_uniform_levels_follow_the_definition_exactly(bits, block):
    # Independent float64 reference: the block's fp32 (low, high) of the real values (not
    # the last block's padding), then the nearest of 2^(bits-1) evenly spaced levels.
    values = _heavy_tailed(1000).float()
    codec = make_value_codec("uniform", {"bits": bits, "block": block})
    enc = codec.encode(values, _ctx())
    decoded = codec.decode(enc.data, enc.params, 1000, _ctx())
    steps = 2 ** (bits - 1) - 1
    expected = torch.empty(1000, dtype=torch.float64)
    for start in range(0, 1000, block):
        part = values[start:start + block].double()
        low, high = part.abs().min().float().double(), part.abs().max().float().double()
        level = torch.round((part.abs() - low) / (high - low) * steps).clamp(0, steps)
        expected[start:start + block] = torch.where(part < 0, -1.0, 1.0) * (low + (high - low) * (level / steps))
    assert torch.equal(decoded, expected.float())


@pytest.mark.parametrize("count", [1000, 1024])  # a short last block, and whole blocks only
@pytest.mark.parametrize("block", [7, 128])
def test_uniform_one_bit_is_the_sign_times_the_block_mean(count, block):
    # Independent float64 reference: each block's mean |v| over its real values, rounded
    # once to the fp32 scale; every value decodes to that scale with its own sign.
    values = _heavy_tailed(count).float()
    values[3] = -0.0  # a negative zero keeps its sign
    codec = make_value_codec("uniform", {"bits": 1, "block": block})
    enc = codec.encode(values, _ctx())
    decoded = codec.decode(enc.data, enc.params, count, _ctx())
    expected = torch.empty(count, dtype=torch.float32)
    for start in range(0, count, block):
        part = values[start:start + block]
        scale = part.double().abs().mean().float()
        expected[start:start + block] = torch.where(torch.signbit(part), -scale, scale)
    assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("block", [7, 128])
def test_uniform_bf16_scales_are_the_fp32_scales_rounded(bits, block):
    # Reference: the fp32-scale payload with every scale rounded to bfloat16, levels then
    # computed from those scales as the receiver sees them.
    values = _heavy_tailed(1000).float()
    wide = make_value_codec("uniform", {"bits": bits, "block": block})
    narrow = make_value_codec("uniform", {"bits": bits, "block": block, "scale": "bf16"})
    enc, enc32 = narrow.encode(values, _ctx()), wide.encode(values, _ctx())
    per_block = 1 if bits == 1 else 2
    nblocks = -(-1000 // block)
    assert enc.data.numel() == 2 * per_block * nblocks + _bits.fixed_nbytes(1000, bits)
    assert enc.data.numel() == enc32.data.numel() - 2 * per_block * nblocks
    assert narrow.encoded_size(10**6, 1000, torch.float32).data == enc.data.numel()
    assert narrow.encoded_size(10**6, 1000, torch.float32).params == len(enc.params) == 6
    decoded = narrow.decode(enc.data, enc.params, 1000, _ctx())
    scales32 = enc32.data[: 4 * per_block * nblocks].view(torch.float32)
    scales16 = enc.data[: 2 * per_block * nblocks].view(torch.bfloat16)
    assert torch.equal(scales16, scales32.to(torch.bfloat16))
    assert torch.equal(torch.signbit(decoded), torch.signbit(values))
    if bits == 1:
        which = torch.arange(1000) // block
        assert torch.equal(decoded.abs(), scales16.float()[which])
    else:  # half a step of the rounded levels, plus how far a magnitude lies outside them
        which = torch.arange(1000) // block
        low, high = scales16.float().reshape(-1, 2)[which].unbind(1)
        outside = torch.clamp(low - values.abs(), min=0) + torch.clamp(values.abs() - high, min=0)
        half_step = (high - low) / (2 * (2 ** (bits - 1) - 1))
        assert bool(((decoded - values).abs() <= half_step + outside + high * 2.0**-22).all())
        assert bool(((decoded - values).abs() <= values.abs() * (1 + 2.0**-7)).all())
    assert torch.linalg.vector_norm(decoded - values) < torch.linalg.vector_norm(values)


def test_uniform_fp32_payloads_keep_their_layout_and_bad_scale_codes_are_rejected():
    values = torch.randn(300)
    enc = make_value_codec("uniform", {"bits": 2, "block": 100}).encode(values, _ctx())
    assert enc.params == struct.pack("<BI", 2, 100)  # the layout older payloads have
    good = make_value_codec("uniform", {"bits": 2, "block": 100, "scale": "bf16"}).encode(values, _ctx())
    with pytest.raises(dr.DecodeError, match="unknown scale dtype code 7"):
        make_value_codec("uniform", {}).decode(good.data, struct.pack("<BIB", 2, 100, 7), 300, _ctx())
    with pytest.raises(dr.DecodeError, match="expected"):  # a bf16 payload read with fp32 scales
        make_value_codec("uniform", {}).decode(good.data, struct.pack("<BI", 2, 100), 300, _ctx())
    with pytest.raises(dr.ConfigError, match="must be one of \\['fp32', 'bf16'\\]"):
        make_value_codec("uniform", {"scale": "fp16"})
    payload = dr.Compressor.from_spec("topk:0.1/eliasfano/uniform:bits=1,scale=bf16").compress(torch.randn(5000))
    assert dr.decode(payload).k == 500


def test_uniform_keeps_non_finite_blocks_non_finite_and_rejects_bad_parts():
    values = torch.randn(300)
    values[5] = float("inf")
    codec = make_value_codec("uniform", {"bits": 3, "block": 100})
    enc = codec.encode(values, _ctx())
    decoded = codec.decode(enc.data, enc.params, 300, _ctx())
    assert not torch.isfinite(decoded[:100]).any() and torch.isfinite(decoded[100:]).all()
    good = codec.encode(torch.randn(300), _ctx())
    flipped = good.data.clone()
    flipped[:8] = torch.cat([good.data[4:8], good.data[0:4]])  # block 0's (low, high) swapped
    with pytest.raises(dr.DecodeError, match="smallest magnitude exceeds its largest"):
        codec.decode(flipped, good.params, 300, _ctx())
    with pytest.raises(dr.DecodeError, match="has"):
        codec.decode(good.data[:-1], good.params, 300, _ctx())
    with pytest.raises(dr.ConfigError, match="must be in \\[1, 8\\]"):
        make_value_codec("uniform", {"bits": 9})


@pytest.mark.parametrize("value", ["uniform:bits=1", "uniform:bits=1,scale=bf16", "uniform:bits=2,block=7",
                                   "uniform:bits=4,scale=bf16,block=64", "uniform:bits=8,block=1000", "qsgd", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_values_known_while_encoding_are_what_receivers_decode(value, dtype):
    """The sender's record of what it sent (error feedback keeps the rest) is bit for bit
    what decode makes of the payload, also where the codec skips the decode."""
    name, _, options = value.partition(":")
    codec = make_value_codec(name, dict(o.split("=") for o in options.split(",")) if options else {})
    gen = torch.Generator().manual_seed(5)
    for k in (0, 1, 5, 127, 128, 129, 1000):
        values = (torch.randn(k, generator=gen, dtype=torch.float64) * torch.logspace(-3, 2, k, dtype=torch.float64)).to(dtype)
        ctx = CodecContext(max(k, 1), dtype, torch.device("cpu"), rng_seed=9)
        part, sent = codec.encode_decoded(values, ctx)
        again = codec.decode(part.data, part.params, k, ctx)
        if sent is None:  # not known while encoding: the compressor decodes its own part
            assert name != "uniform"
            result = dr.Compressor.from_spec(f"topk:1/raw/{value}").compress_detailed(values, step=3)
            sent, again = result.sent.values, dr.decode(result.payload).values
        assert sent.dtype == again.dtype == dtype
        assert torch.equal(sent.view(torch.uint8) if k else sent, again.view(torch.uint8) if k else again), (value, k)

"""The per-step engine in one process: message framing, exact replay of the averaging on a
one-rank transport, the options every front end shares, and bad input."""

from __future__ import annotations

import pytest
import torch

import deepreduce as dr
from deepreduce.engine import Engine, GradientSync, Segment
from deepreduce.engine.framing import frame, framed_size, unframe
from helpers import SoloTransport
from workers.cases import EXCHANGE_MIN_NUMEL, EXCHANGE_SPEC, MODEL_SHAPES, expected_averages, make_parameters, model_gradients

# --- framing ------------------------------------------------------------------------------------


def test_frame_round_trip_and_alignment():
    entries = [torch.arange(5, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), torch.full((9,), 7, dtype=torch.uint8)]
    message = frame(entries)
    assert message.numel() == 8 * 4 + 8 + 0 + 16 == framed_size([5, 0, 9])
    back = unframe(message, len(entries))
    for sent, got in zip(entries, back):
        assert torch.equal(sent, got)
    assert [e.storage_offset() % 8 for e in back] == [0, 0, 0]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m[:4], "cannot hold the entry count"),
        (lambda m: m, "carries 3 entries, expected 2"),
        (lambda m: m[:-8], "add up to"),
        (lambda m: torch.cat([m[:8], torch.tensor([-5], dtype=torch.int64).view(torch.uint8), m[16:]]), "negative entry size"),
        (lambda m: m[:12], "cannot hold the size table"),
    ],
)
def test_unframe_rejects_malformed_messages(mutate, match):
    message = frame([torch.arange(5, dtype=torch.uint8), torch.ones(9, dtype=torch.uint8), torch.ones(3, dtype=torch.uint8)])
    expected = 2 if "expected 2" in match else 3
    with pytest.raises(dr.DecodeError, match=match):
        unframe(mutate(message), expected)


# --- the engine on one rank ------------------------------------------------------------------------


def test_gradient_sync_matches_the_replay():
    """Per-parameter compression with error feedback, raw small tensors, divide-then-add."""
    params = make_parameters()
    sync = GradientSync(SoloTransport(), dr.Compressor.from_spec(EXCHANGE_SPEC), params, min_numel=EXCHANGE_MIN_NUMEL)
    expected = expected_averages(1, 3)
    for step in range(3):
        for name, param in params:
            param.grad = model_gradients(0, step)[name].clone()
        sync.synchronize()
        for name, param in params:
            assert torch.equal(param.grad, expected[step][name]), (step, name)
    stats = sync.stats()
    assert stats["steps"] == 3 and stats["step"] == 3 and stats["ratio"] > 5 and stats["compressed_buckets"] == 3


def test_gradient_sync_packs_small_tensors_for_its_small_compressor():
    """With a small compressor the small gradients share payloads; lossless, every
    gradient comes back exactly, and each keeps its own (here empty) residual."""
    torch.manual_seed(0)
    shapes = [("w1", (40, 30)), ("b1", (30,)), ("norm", (30,)), ("w2", (30, 40)), ("b2", (40,))]
    params = [(name, torch.nn.Parameter(torch.randn(shape))) for name, shape in shapes]
    sync = GradientSync(SoloTransport(), dr.Compressor(ratio=0.5, value="raw"), params, min_numel=1000,
                        small_compressor="topk:1/strided/raw")
    segments = sync.groups[0].segments
    assert [seg.name for seg in segments] == ["w1", "w2", ("b1", "norm", "b2")]
    assert segments[2].parts == (("b1", 30), ("norm", 30), ("b2", 40)) and segments[2].offset == 2400
    grads = {name: torch.randn(p.shape) for name, p in params}
    for name, p in params:
        p.grad = grads[name].clone()
    sync.synchronize()
    for name in ("b1", "norm", "b2"):
        assert torch.equal(dict(params)[name].grad, grads[name])
        assert not sync.engine.memory.residual(name).any()
    assert int(torch.count_nonzero(dict(params)["w1"].grad)) == 600
    unpacked = GradientSync(SoloTransport(), dr.Compressor(ratio=0.5, value="raw"), params, min_numel=1000)
    # raw small tensors: one segment each, as given; the large ones still share a payload
    group = unpacked.groups[0]
    assert [seg.name for seg in group.segments] == [name for name, _ in shapes]
    sent = unpacked.engine._segments(torch.zeros(group.numel), group.segments, 0)
    assert [(seg.name, seg.spans) for seg in sent] == [(("w1", "w2"), (0, 1260)), ("b1", None), ("norm", None),
                                                       ("b2", None)]
    apart = GradientSync(SoloTransport(), dr.Compressor(ratio=0.5, value="raw"), params, min_numel=1000,
                         pack_tensors=False)
    assert len(apart.engine._segments(torch.zeros(group.numel), apart.groups[0].segments, 0)) == 5


def test_missing_gradients_count_as_zeros():
    params = make_parameters()
    sync = GradientSync(SoloTransport(), dr.Compressor(ratio=1.0, value="raw"), params, min_numel=EXCHANGE_MIN_NUMEL)
    params[0][1].grad = torch.ones(MODEL_SHAPES[0][1])
    sync.synchronize()
    assert torch.equal(params[0][1].grad, torch.ones(MODEL_SHAPES[0][1]))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for _, p in params[1:])


def test_gradient_sync_rejects_bad_arguments():
    params = make_parameters()
    with pytest.raises(TypeError, match="Transport"):
        GradientSync(object(), dr.Compressor(), params)
    with pytest.raises(dr.ConfigError, match="Compressor"):
        GradientSync(SoloTransport(), "topk", params)
    with pytest.raises(ValueError, match="repeated: a"):
        GradientSync(SoloTransport(), dr.Compressor(), [("a", params[0][1]), ("a", params[1][1])])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        GradientSync(SoloTransport(), dr.Compressor(), [("i", torch.zeros(3, dtype=torch.int64))])
    sparse = torch.nn.Embedding(10, 3, sparse=True)
    sparse(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradient"):
        GradientSync(SoloTransport(), dr.Compressor(), [("e", sparse.weight)]).synchronize()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"start_iter": -1}, "start_iter must be a non-negative int"),
        ({"min_numel": 1.5}, "min_numel must be a non-negative int"),
        ({"granularity": "layer"}, "granularity must be one of"),
        ({"momentum": 1.0}, "momentum must be in"),
    ],
)
def test_engine_rejects_bad_options(options, match):
    with pytest.raises(dr.ConfigError, match=match):
        Engine(SoloTransport(), dr.Compressor(), **options)


def test_engine_rejects_segments_that_do_not_tile_the_buffer():
    engine = Engine(SoloTransport(), dr.Compressor(), min_numel=0)
    with pytest.raises(ValueError, match="cover 8 elements, the buffer has 10"):
        engine.reduce(torch.zeros(10), [Segment("a", 0, 4), Segment("b", 4, 4)])
    with pytest.raises(ValueError, match="tile the buffer in order"):
        engine.reduce(torch.zeros(10), [Segment("a", 0, 4), Segment("b", 5, 5)])
    with pytest.raises(ValueError, match="flat"):
        engine.reduce(torch.zeros(2, 5))


def test_warmup_small_buckets_and_fallback_are_counted():
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.9, value="raw"), start_iter=1, min_numel=50)
    buffer = torch.randn(100)
    engine.reduce(buffer.clone()).wait()  # warm-up: dense
    engine.end_step()
    engine.reduce(torch.randn(10)).wait()  # small: dense
    out = engine.reduce(buffer.clone()).wait()  # compressed (or, at 90 % kept, the dense fallback)
    engine.end_step()
    stats = engine.stats()
    assert (stats["warmup_buckets"], stats["small_buckets"], stats["steps"]) == (1, 1, 2)
    assert stats["compressed_buckets"] + stats["dense_fallbacks"] == 1
    assert out.shape == buffer.shape


def test_dense_fallback_when_the_gather_would_move_more():
    """Every element with a raw int32 index and an fp32 value, plus the header, is more
    than twice the bucket: the bucket is allreduced instead, and nothing is lost."""
    engine = Engine(SoloTransport(), dr.Compressor(ratio=1.0, index="raw", value="raw"), min_numel=0)
    buffer = torch.randn(64)
    want = buffer.clone()
    out = engine.reduce(buffer).wait()
    assert engine.stats()["dense_fallbacks"] == 1 and torch.equal(out, want)


def test_state_dict_round_trip_and_format_check():
    params = make_parameters()
    sync = GradientSync(SoloTransport(), dr.Compressor.from_spec(EXCHANGE_SPEC), params, min_numel=EXCHANGE_MIN_NUMEL)
    for name, param in params:
        param.grad = model_gradients(0, 0)[name].clone()
    sync.synchronize()
    state = sync.state_dict()
    assert state["step"] == 1 and set(state["memory"]["residuals"]) == {"embed.weight", "proj.weight"}
    other = GradientSync(SoloTransport(), dr.Compressor.from_spec(EXCHANGE_SPEC), make_parameters(), min_numel=EXCHANGE_MIN_NUMEL)
    other.load_state_dict(state)
    assert other.step == 1 and torch.equal(other.engine.memory.residual("embed.weight"), sync.engine.memory.residual("embed.weight"))
    with pytest.raises(ValueError, match="state dict"):
        other.load_state_dict({"format": 99})
    # A truncated state is named, not a KeyError, and changes nothing
    for drop, named in (("memory", "missing or malformed memory"), ("compressor", "missing or malformed compressor")):
        with pytest.raises(ValueError, match=named):
            other.load_state_dict({k: v for k, v in state.items() if k != drop} | {"step": 7})
        assert other.step == 1


def test_density_warmup_falls_exponentially_to_the_target():
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), start_iter=2, density_warmup=4, min_numel=0)
    assert [round(engine.density(step), 4) for step in range(7)] == [1.0, 1.0, 0.3162, 0.1, 0.0316, 0.01, 0.01]
    kept = []
    for _ in range(7):
        before = engine.stats()["kept"]
        engine.reduce(torch.randn(10_000)).wait()
        kept.append(engine.stats()["kept"] - before)
        engine.end_step()
    assert kept == [0, 0, 3162, 1000, 316, 100, 100]  # two dense warm-up steps, then the ramp
    assert engine.describe()["density_warmup"] == 4


def test_density_scale_sets_each_steps_density():
    factors = {2: 3.0, 3: 0.5, 4: 1000.0}  # step 4: capped at dense
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), start_iter=2, min_numel=0,
                    density_scale=lambda step: factors.get(step, 1.0))
    assert [engine.density(step) for step in range(6)] == [0.01, 0.01, 0.03, 0.005, 1.0, 0.01]
    kept = []
    for _ in range(6):
        before = engine.stats()["kept"]
        engine.reduce(torch.randn(10_000)).wait()
        kept.append(engine.stats()["kept"] - before)
        engine.end_step()
    assert kept == [0, 0, 300, 50, 10_000, 100]  # two dense warm-up steps, then the scaled densities
    assert engine.describe()["density_scale"][:2] == [0.03, 0.005]  # compared across ranks
    with pytest.raises(dr.ConfigError, match="density_scale must be a function"):
        Engine(SoloTransport(), dr.Compressor(), density_scale=2.0)
    broken = Engine(SoloTransport(), dr.Compressor(value="raw"), min_numel=0, density_scale=lambda step: float("nan"))
    with pytest.raises(dr.ConfigError, match="density_scale returned nan"):
        broken.reduce(torch.randn(100)).wait()


def test_clip_norm_scales_each_bucket_before_compression():
    engine = Engine(SoloTransport(), dr.Compressor(ratio=1.0, index="raw", value="raw"), min_numel=0,
                    dense_fallback=False, clip_norm=2.0)
    big, small = torch.full((100,), 1.0), torch.full((100,), 0.01)
    out = engine.reduce(big.clone()).wait()
    assert torch.allclose(torch.linalg.vector_norm(out), torch.tensor(2.0)) and torch.allclose(out, big / 5)
    assert torch.equal(engine.reduce(small.clone()).wait(), small)  # below the limit: untouched
    for bad in (0, float("inf"), float("nan"), True):
        with pytest.raises(dr.ConfigError, match="clip_norm must be a finite positive number"):
            Engine(SoloTransport(), dr.Compressor(), clip_norm=bad)


@pytest.mark.parametrize("option", ["error_feedback", "dense_fallback", "average"])
def test_switches_take_booleans_only(option):
    # "no" or "false" would otherwise count as True
    for bad in ("no", "false", 0, None):
        with pytest.raises(dr.ConfigError, match=f"{option} must be True or False, got {bad!r}"):
            Engine(SoloTransport(), dr.Compressor(), **{option: bad})


def test_small_compressor_carries_the_small_segments_with_error_feedback():
    """Segments below min_numel go through small_compressor (8-bit values, every element,
    no index bits) instead of raw: fewer bytes, a bounded error, and the rounding error
    kept in the residual, so two steps deliver the sum of both to within one step's error."""
    spec = "topk:1/strided/uniform:bits=8"
    plain = Engine(SoloTransport(), dr.Compressor(ratio=0.1, value="raw"), min_numel=200, dense_fallback=False)
    small = Engine(SoloTransport(), dr.Compressor(ratio=0.1, value="raw"), min_numel=200, dense_fallback=False,
                   small_compressor=spec)
    segments = [Segment("big", 0, 1000), Segment("bias", 1000, 100)]
    torch.manual_seed(0)
    first, second = torch.randn(1100), torch.randn(1100)
    outs, residuals = [], []
    for engine in (plain, small):
        got = []
        for grad in (first, second):
            got.append(engine.reduce(grad.clone(), segments).wait().clone())
            engine.end_step()
            if engine is small and grad is first:
                residuals.append(engine.memory.residual("bias").clone())
        outs.append(got)
    assert torch.equal(outs[0][0][1000:], first[1000:])  # raw: exact
    error = (outs[1][0][1000:] - first[1000:]).norm() / first[1000:].norm()
    assert 0 < error < 0.02  # 8 bits per value with a per-block range
    assert torch.equal(outs[1][0][:1000], outs[0][0][:1000])  # the large segment is unchanged
    assert torch.allclose(outs[1][0][1000:] + residuals[0], first[1000:], atol=1e-6)
    two_steps = outs[1][0][1000:] + outs[1][1][1000:]
    assert (two_steps - (first + second)[1000:]).norm() < (outs[1][1][1000:] - second[1000:]).norm() * 1.5
    assert small.stats()["payload_bytes"] < plain.stats()["payload_bytes"] - 2 * 150  # 400 raw bytes vs ~200
    assert small.stats()["size_exchanges"] == 0  # its sizes are computable too: no exchange
    exchanged = Engine(SoloTransport(), dr.Compressor(ratio=0.1, value="raw"), min_numel=200, dense_fallback=False,
                       small_compressor=spec, size_exchange="always")
    for grad, want in zip((first, second), outs[1]):
        assert torch.equal(exchanged.reduce(grad.clone(), segments).wait(), want)
        exchanged.end_step()
    # the spec, for the agreement check's message, and the fingerprint (spec and seed)
    assert small.describe()["small_compressor"] == [dr.Compressor.from_spec(spec).spec, dr.Compressor.from_spec(spec).fingerprint]
    assert plain.describe()["small_compressor"] is None


def test_cyclic_small_compressor_sends_an_eighth_per_step_and_everything_within_eight():
    """``cyclic:0.125/strided/fp16`` for the small segments (the update mode's advice):
    each step exactly the elements at this step's offset travel, with everything they
    gathered since their last turn; what was sent plus the residual is the sum of all
    steps (fp16 rounding kept by error feedback)."""
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.1, value="raw"), min_numel=200, dense_fallback=False,
                    small_compressor="cyclic:0.125/strided/fp16")
    segments = [Segment("big", 0, 1000), Segment("bias", 1000, 100)]
    torch.manual_seed(1)
    grads = [torch.randn(1100) for _ in range(8)]
    delivered = torch.zeros(100)
    for step, grad in enumerate(grads):
        out = engine.reduce(grad.clone(), segments).wait()[1000:]
        engine.end_step()
        sent = out.nonzero().flatten()
        assert torch.equal(sent, torch.arange(step % 8, 100, 8))
        delivered += out
    total = torch.stack(grads).sum(0)[1000:]
    assert torch.allclose(delivered + engine.memory.residual("bias"), total, atol=1e-5)
    # What waits is exactly what arrived after each element's turn (plus fp16 rounding).
    since_turn = torch.stack([torch.stack(grads)[j % 8 + 1:, 1000 + j].sum() for j in range(100)])
    assert (engine.memory.residual("bias") - since_turn).abs().max() < 1e-2
    assert engine.stats()["size_exchanges"] == 0  # both of cyclic's counts are known ahead: no size exchange


@pytest.mark.parametrize("value, match", [(42, "small_compressor must be"), ("nosuch:1", "small_compressor: "),
                                          ("topk:0/raw/raw", "ratio 0 sends nothing")])
def test_small_compressor_rejects_bad_values(value, match):
    with pytest.raises(dr.ConfigError, match=match):
        Engine(SoloTransport(), dr.Compressor(), small_compressor=value)


def test_small_compressor_is_refused_by_the_shared_index_scheme():
    with pytest.raises(dr.ConfigError, match="small_compressor applies to scheme 'allgather' only"):
        Engine(SoloTransport(), dr.Compressor(), scheme="shared_index", small_compressor="topk:1/strided/uniform:bits=4")

"""compressor="auto" (deepreduce.engine.plan): the link fit, the choice rule, the settings
it refuses, the plan on one process (options, residual hand-over, checkpoints)."""

from __future__ import annotations

import math

import pytest
import torch

import deepreduce as dr
from deepreduce.apps.bench.profile import LoopbackTransport
from deepreduce.engine import Engine, Segment
from deepreduce.engine.plan import DENSE, FP16, AutoPlan, Link, allreduce_wire_bytes, choose, fit_link
from helpers import SoloTransport

LOSSLESS = "topk:0.05/raw/raw"  # kept values travel exactly: sums over steps are checkable


def test_fit_link_recovers_latency_and_rate():
    link = Link(0.002, 5e6)
    fitted = fit_link([(b, link.seconds(b)) for b in (1e3, 1e5, 4e6)])
    assert math.isclose(fitted.latency_s, 0.002, rel_tol=1e-9)
    assert math.isclose(fitted.bytes_per_s, 5e6, rel_tol=1e-9)


def test_fit_link_one_size_and_negative_intercept():
    assert fit_link([(1e6, 0.5), (1e6, 0.5)]) == Link(0.0, 2e6)
    fitted = fit_link([(1e3, 0.0001), (1e6, 0.5)])  # a line through them would cross below zero
    assert fitted.latency_s == 0.0 and fitted.bytes_per_s > 0
    with pytest.raises(ValueError, match="at least one sample"):
        fit_link([(0, 1.0)])


def test_allreduce_wire_bytes():
    assert allreduce_wire_bytes(100, 2) == 100
    assert allreduce_wire_bytes(100, 4) == 150


def test_choose_prefers_the_less_lossy_within_tolerance():
    order = [DENSE, FP16, "a", "b"]
    assert choose({DENSE: 1.0, FP16: 0.6, "a": 0.5, "b": 0.3}, order, 0.05) == "b"
    assert choose({DENSE: 1.0, FP16: 0.6, "a": 0.31, "b": 0.3}, order, 0.05) == "a"
    assert choose({DENSE: 1.04, FP16: None, "a": 1.2, "b": 1.0}, order, 0.05) == DENSE
    assert choose({DENSE: 1.0, FP16: None, "a": None, "b": None}, order, 0.0) == DENSE
    with pytest.raises(ValueError, match="no eligible"):
        choose({DENSE: None}, order, 0.05)


@pytest.mark.parametrize("kwargs, message", [
    ({"candidates": []}, "at least one sparse candidate"),
    ({"candidates": ["dense"]}, "always considered"),
    ({"candidates": ["topk:0.01/eliasfano/fp16"] * 2}, "repeat"),
    ({"candidates": ["nosuch:0.01"]}, "auto plan candidate"),
    ({"candidates": [3]}, "spec strings or Compressors"),
    ({"tolerance": -0.1}, "tolerance"),
    ({"check_every": -1}, "check_every"),
    ({"drift": 0}, "drift"),
    ({"link": (0.0, 0.0)}, "link"),
    ({"link": "fast"}, "link"),
])
def test_bad_plan_options_are_refused(kwargs, message):
    with pytest.raises(dr.ConfigError, match=message):
        AutoPlan(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "shared_index"}, "scheme='allgather'"),
    ({"momentum": 0.9}, "momentum"),
    ({"density_warmup": 10}, "density_warmup"),
    ({"density_scale": lambda step: 1.0}, "density_scale"),
])
def test_engine_refuses_settings_the_plan_cannot_honour(kwargs, message):
    with pytest.raises(dr.ConfigError, match=message):
        Engine(SoloTransport(), "auto", check=False, **kwargs)


def test_front_ends_take_auto_and_the_update_mode_refuses_it():
    state = dr.DeepReduceState(compressor="auto", seed=3)
    assert state.describe()["compressor"] == "auto" and state.engine.plan is not None
    assert state.engine.plan.compressors[0].seed == 3
    with pytest.raises(dr.ConfigError, match="conflicts"):
        dr.DeepReduceState(compressor=AutoPlan(seed=1), seed=2)
    with pytest.raises(dr.ConfigError, match="update mode needs a compressor spec"):
        dr.UpdateSync(torch.nn.Linear(4, 4).named_parameters(), "auto")
    with pytest.raises(dr.ConfigError, match="'auto'"):
        Engine(SoloTransport(), "topk:0.01", check=False)


def _engine(link: tuple[float, float], world: int = 2, **plan_options) -> Engine:
    plan = AutoPlan([LOSSLESS], link=link, check_every=0, **plan_options)
    return Engine(LoopbackTransport(world), plan, start_iter=1, min_numel=64, check=False)


def _step(engine: Engine, grad: torch.Tensor) -> torch.Tensor:
    out = engine.reduce(grad.clone(), [Segment("w", 0, grad.numel())], key=0).wait().clone()
    engine.end_step()
    return out


def test_slow_link_plans_sparse_fast_link_plans_dense():
    grad = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    slow, fast = _engine((0.001, 1e5)), _engine((0.0, 1e13))
    for engine in (slow, fast):
        for _ in range(3):
            _step(engine, grad)
    assert slow.stats()["plan"]["buckets"] == {"0": LOSSLESS}
    assert slow.stats()["compressed_buckets"] == 2 and slow.stats()["planned_dense_buckets"] == 0
    assert fast.stats()["plan"]["buckets"] == {"0": DENSE}
    assert fast.stats()["compressed_buckets"] == 0 and fast.stats()["planned_dense_buckets"] == 2
    predicted = slow.stats()["plan"]["predicted_s"]["0"]
    assert set(predicted) == {DENSE, FP16, LOSSLESS}
    assert predicted[DENSE] == pytest.approx(0.001 + 4 * 20_000 / 1e5)  # W=2: the bucket's bytes on the wire
    assert predicted[FP16] > predicted[DENSE] / 2


def test_one_rank_plans_dense_without_probing_a_link():
    # At W=1 there is no link to measure (an allreduce moves no bytes): every bucket is dense.
    grad = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    engine = Engine(SoloTransport(), AutoPlan([LOSSLESS], check_every=0), start_iter=1, min_numel=64, check=False)
    for _ in range(3):
        assert torch.equal(_step(engine, grad), grad)
    assert engine.stats()["plan"]["buckets"] == {"0": DENSE} and engine.plan.link is None
    assert engine.stats()["compressed_buckets"] == 0


def test_fp16_plan_averages_in_fp16():
    grad = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    plan = AutoPlan([LOSSLESS], link=(0.0, 1e5), check_every=0)
    engine = Engine(LoopbackTransport(2), plan, start_iter=1, min_numel=64, check=False)
    _step(engine, grad)
    plan.choices[0] = (grad.numel(), FP16)  # as planned for a link where fp16 wins
    out = _step(engine, grad)
    expected = grad.to(torch.float16).div(2).mul(2).to(torch.float32)  # loopback: W copies of this rank's half
    assert torch.equal(out, expected)
    assert engine.stats()["sent_bytes"] == grad.numel() * 4 + grad.numel() * 2


def test_a_bucket_that_goes_dense_sends_its_residual():
    gen = torch.Generator().manual_seed(2)
    engine = Engine(LoopbackTransport(2), AutoPlan([LOSSLESS], link=(0.001, 1e4), check_every=0), start_iter=1,
                    min_numel=64, check=False)
    grads = [torch.randn(5_000, generator=gen) for _ in range(5)]
    outs = [_step(engine, g) for g in grads[:4]]
    assert engine.stats()["plan"]["buckets"] == {"0": LOSSLESS}
    assert engine.memory.residual("w") is not None and engine.memory.residual("w").abs().sum() > 0
    engine.plan.link = Link(0.0, 1e13)  # as a re-plan after the link got fast
    engine.plan._stale = {0}
    outs.append(_step(engine, grads[4]))
    assert engine.stats()["plan"]["buckets"] == {"0": DENSE}
    assert engine.memory.residual("w") is None
    torch.testing.assert_close(sum(outs), sum(grads), rtol=0, atol=1e-5)  # nothing held back is lost


def test_the_plan_survives_a_checkpoint():
    grad = torch.randn(20_000, generator=torch.Generator().manual_seed(3))
    engine = _engine((0.001, 1e5))
    for _ in range(3):
        _step(engine, grad)
    saved = engine.state_dict()
    fresh = _engine((0.0, 1e13))  # would plan dense if it planned again
    fresh.load_state_dict(saved)
    _step(fresh, grad)
    assert fresh.stats()["plan"]["buckets"] == {"0": LOSSLESS}
    other = Engine(LoopbackTransport(2), AutoPlan(["topk:0.01/eliasfano/fp16"], check_every=0), start_iter=1,
                   check=False)
    with pytest.raises(dr.ConfigError, match="does not offer"):
        other.load_state_dict(saved)


def test_a_changed_bucket_is_planned_again():
    engine = _engine((0.001, 1e5))
    for numel in (20_000, 20_000, 30_000):
        _step(engine, torch.ones(numel))
    assert engine.plan.choices[0][0] == 30_000

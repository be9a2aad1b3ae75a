"""In-process reliability checks of the engine: non-finite gradients, error-feedback memory
that survives a changed bucket layout, steady-state stats, degenerate configurations.
(Across processes, with DDP and AMP's GradScaler: tests/test_hook_dist.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

import deepreduce as dr
from deepreduce.codecs.index.bloom import default_fpr
from deepreduce.engine import Engine, ErrorFeedback, Segment
from deepreduce.engine.presized import nonfinite_message
from deepreduce.sparse import SparseGrad
from helpers import SoloTransport, completed


class PeerNotFinite(SoloTransport):
    """Two ranks; from the second step on, the other one's bucket is not finite: NaN at
    position 3, as a real peer's would be. With a size exchange it reports the flag -2
    there and contributes the NaN to the allreduce; without one (sizes computed) its
    gathered message carries the flag and the position. (At first it mirrors this rank.)"""

    world_size = 2

    def __init__(self) -> None:
        self.exchanges = 0
        self.gathers = 0

    def allgather_sizes(self, nbytes: int) -> list[int]:
        self.exchanges += 1
        return [nbytes, nbytes if self.exchanges == 1 else -2]

    def allgather_async(self, payload: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        self.gathers += 1
        if self.gathers == 1 or self.exchanges:
            return completed([payload.clone(), payload.clone()])
        peer = torch.zeros(4000)
        peer[3] = float("nan")
        return completed([payload.clone(), nonfinite_message(peer, payload.numel())])

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        peer = torch.zeros_like(tensor)
        peer[3] = float("nan")
        return completed(tensor.add_(peer))


def _segments(numel: int) -> list[Segment]:
    return [Segment("w", 0, numel)]


# --- non-finite gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", ["topk:0.01/eliasfano/fp16", "mstopk:0.01/eliasfano/fp16", "dgc:0.01/raw/raw",
                                  "topk:0.01/eliasfano/qsgd", "topk:0.01/eliasfano/polyfit", "topk:0.01/eliasfano/dexp"])
def test_a_nonfinite_bucket_goes_dense_and_keeps_no_residual(spec, bad):
    """As under allreduce: the average is non-finite exactly where the gradient was, and
    the residual is untouched that step (then training goes on as before)."""
    engine = Engine(SoloTransport(), dr.Compressor.from_spec(spec), min_numel=0)
    gen = torch.Generator().manual_seed(0)
    engine.reduce(torch.randn(5000, generator=gen), _segments(5000)).wait()
    engine.end_step()
    before = engine.memory.residual("w").clone()
    grad = torch.randn(5000, generator=gen)
    grad[[7, 4000]] = bad
    out = engine.reduce(grad.clone(), _segments(5000)).wait()
    engine.end_step()
    assert torch.equal(torch.nonzero(~torch.isfinite(out)).reshape(-1), torch.tensor([7, 4000]))
    assert torch.equal(engine.memory.residual("w"), before)
    stats = engine.stats()
    assert stats["nonfinite_buckets"] == 1 and stats["compressed_buckets"] == 1
    out = engine.reduce(torch.randn(5000, generator=gen), _segments(5000)).wait()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(engine.memory.residual("w")).all())


@pytest.mark.parametrize("size_exchange", ["auto", "always"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_another_ranks_nonfinite_bucket_rolls_back_this_ranks_error_feedback(momentum, size_exchange):
    engine = Engine(PeerNotFinite(), dr.Compressor(ratio=0.01, value="raw"), min_numel=0, momentum=momentum, check=False,
                    size_exchange=size_exchange)
    gen = torch.Generator().manual_seed(1)
    engine.reduce(torch.randn(4000, generator=gen), _segments(4000)).wait()
    engine.end_step()
    residual = engine.memory.residual("w").clone()
    velocity = engine.memory.velocities["w"].clone() if momentum else None
    out = engine.reduce(torch.randn(4000, generator=gen), _segments(4000)).wait()
    assert torch.isnan(out[3]) and int(torch.isnan(out).sum()) == 1
    assert torch.allclose(engine.memory.residual("w"), residual, rtol=0, atol=1e-6)
    if momentum:
        assert torch.allclose(engine.memory.velocities["w"], velocity, rtol=0, atol=1e-5)
    assert engine.stats()["nonfinite_buckets"] == 1
    assert engine.stats()["size_exchanges"] == (2 if size_exchange == "always" else 0)


def test_nonfinite_is_logged_once(caplog):
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.01), min_numel=0)
    with caplog.at_level(logging.WARNING, logger="deepreduce"):
        for step in range(3):
            engine.reduce(torch.full((2000,), float("nan")), _segments(2000)).wait()
            engine.end_step()
    warnings = [r for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warnings) == 1 and "rank 0" in warnings[0].getMessage() and "step 0" in warnings[0].getMessage()
    assert engine.stats()["nonfinite_buckets"] == 3


def test_nonfinite_raise_names_rank_bucket_and_step():
    engine = Engine(PeerNotFinite(), dr.Compressor(ratio=0.01), min_numel=0, nonfinite="raise", check=False,
                    size_exchange="always")
    engine.reduce(torch.randn(4000), _segments(4000), key="b0").wait()
    engine.end_step()
    with pytest.raises(dr.NonFiniteError, match=r"bucket 'b0' at step 1: the gradient of rank 1 is not finite"):
        engine.reduce(torch.randn(4000), _segments(4000), key="b0")
    # Without a size exchange the flag arrives with the gather: the future fails, on every rank.
    engine = Engine(PeerNotFinite(), dr.Compressor(ratio=0.01), min_numel=0, nonfinite="raise", check=False)
    engine.reduce(torch.randn(4000), _segments(4000), key="b0").wait()
    engine.end_step()
    with pytest.raises(RuntimeError, match=r"NonFiniteError: deepreduce: bucket 'b0' at step 1: the gradient of rank 1 is not finite"):
        engine.reduce(torch.randn(4000), _segments(4000), key="b0").wait()
    assert engine.stats()["size_exchanges"] == 0
    # Dense buckets (warm-up, small ones) check the allreduced result instead (the error
    # comes from the future, wrapped in the RuntimeError torch's futures raise).
    dense = Engine(SoloTransport(), dr.Compressor(ratio=0.01), min_numel=10_000, nonfinite="raise")
    with pytest.raises(RuntimeError, match="NonFiniteError: deepreduce: bucket 5 at step 0: the allreduced gradient is not finite"):
        dense.reduce(torch.tensor([1.0, float("inf")]), key=5).wait()


# --- error feedback across bucket layouts --------------------------------------------------------


def test_bucket_residuals_follow_their_parameters_into_a_new_layout():
    """One top-k per bucket; then the buckets are regrouped (DDP's rebuild, another
    bucket_cap_mb): every parameter's residual moves with it, none is lost or mixed."""
    memory = ErrorFeedback()
    a, b, c = torch.arange(1.0, 4.0), torch.arange(10.0, 15.0), torch.arange(20.0, 22.0)
    for key, parts, grad in ((("a", "b"), (("a", 3), ("b", 5)), torch.cat([a, b])), (("c",), (("c", 2),), c)):
        compensated = memory.compensate(key, grad, parts)
        memory.update(key, compensated, SparseGrad(torch.tensor([0]), compensated[:1].clone(), grad.numel()))
    # New layout: (c, a) and (b,).
    residual_a = memory.residual("a").clone()
    compensated = memory.compensate(("c", "a"), torch.zeros(5), (("c", 2), ("a", 3)))
    assert torch.equal(compensated, torch.tensor([0.0, 21.0, 0.0, 2.0, 3.0]))  # c's and a's first elements were sent
    assert torch.equal(residual_a, torch.tensor([0.0, 2.0, 3.0]))  # the old bucket's first element was a's
    compensated_b = memory.compensate(("b",), torch.ones(5), (("b", 5),))
    assert torch.equal(compensated_b, b + 1)
    memory.update(("b",), compensated_b, SparseGrad(torch.tensor([], dtype=torch.int64), torch.tensor([]), 5))
    memory.update(("c", "a"), compensated, SparseGrad(torch.tensor([], dtype=torch.int64), torch.tensor([]), 5))
    saved = memory.state_dict()["residuals"]
    assert set(saved) == {"a", "b", "c"}  # saved per parameter, whatever the layout
    assert torch.equal(saved["a"], residual_a) and torch.equal(saved["b"], b + 1)


def test_loaded_per_parameter_state_assembles_any_layout():
    memory = ErrorFeedback()
    memory.load_state_dict({"residuals": {"x": torch.ones(2), "y": torch.full((3,), 2.0)}, "velocities": {}})
    compensated = memory.compensate(("y", "z", "x"), torch.zeros(7), (("y", 3), ("z", 2), ("x", 2)))
    assert torch.equal(compensated, torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0, 1.0, 1.0]))


def test_engine_bucket_granularity_saves_residuals_by_parameter():
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), min_numel=0, granularity="bucket")
    segments = [Segment("w1", 0, 3000), Segment("w2", 3000, 1000)]
    engine.reduce(torch.randn(4000), segments).wait()
    state = engine.state_dict()
    assert set(state["memory"]["residuals"]) == {"w1", "w2"}
    other = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), min_numel=0, granularity="bucket")
    other.load_state_dict(state)
    # Reversed layout after the resume: the residuals still land on their own parameters.
    assert torch.equal(other.memory.compensate(("w2", "w1"), torch.zeros(4000), (("w2", 1000), ("w1", 3000))),
                       torch.cat([state["memory"]["residuals"]["w2"], state["memory"]["residuals"]["w1"]]))



def test_bucket_granularity_leaves_the_trailing_small_tensors_to_the_small_compressor():
    """One top-k over the large tensors (w2, 100x larger, takes all of it), while the small
    tensors laid out after them keep their own payloads: an eighth of each per step."""
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), min_numel=100, granularity="bucket",
                    small_compressor="cyclic:0.125/strided/raw")
    segments = [Segment("w1", 0, 3000), Segment("w2", 3000, 1000),
                Segment(("b1", "b2"), 4000, 64, parts=(("b1", 48), ("b2", 16))), Segment("b3", 4064, 32)]
    buffer = torch.cat([torch.randn(3000), 100 * torch.randn(1000), torch.randn(96)])
    sent = engine.reduce(buffer.clone(), segments).wait()
    residuals = engine.state_dict()["memory"]["residuals"]
    assert set(residuals) == {"w1", "w2", "b1", "b2", "b3"}
    assert torch.equal(residuals["w1"], buffer[:3000]) and torch.count_nonzero(sent[:3000]) == 0
    assert torch.count_nonzero(sent[3000:4000]) == 40  # 1 % of the 4000 merged elements
    assert torch.count_nonzero(sent[4000:4064]) == 8 and torch.count_nonzero(sent[4064:]) == 4
    assert torch.equal(sent[4000:] + torch.cat([residuals["b1"], residuals["b2"], residuals["b3"]]), buffer[4000:])
    # Without a small compressor the whole bucket is one top-k, as before.
    plain = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), min_numel=100, granularity="bucket")
    assert torch.count_nonzero(plain.reduce(buffer.clone(), segments).wait()) == 41  # 1 % of 4096, all in w2

# --- stats and degenerate configurations ------------------------------------------------------


def test_steady_state_stats_leave_the_warmup_out():
    engine = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), start_iter=3, density_warmup=2, min_numel=0)
    for _ in range(10):
        engine.reduce(torch.randn(10_000)).wait()
        engine.end_step()
    stats = engine.stats()
    steady = stats["steady"]
    assert steady["steps"] == 10 - 4 and steady["kept"] == 6 * 100
    assert steady["bits_per_kept"] == pytest.approx(8 * steady["payload_bytes"] / 600)
    assert steady["sent_bytes_per_step"] == steady["sent_bytes"] / 6
    assert steady["ratio"] > 3 * stats["ratio"]  # three dense steps and a 10 % one weigh on the total
    restored = Engine(SoloTransport(), dr.Compressor(ratio=0.01, value="raw"), start_iter=3, density_warmup=2, min_numel=0)
    restored.load_state_dict(engine.state_dict())
    assert restored.stats()["steady"] == steady
    assert Engine(SoloTransport(), dr.Compressor(), start_iter=5).stats()["steady"] is None


@pytest.mark.parametrize("spec", ["topk:0/eliasfano/fp16", "randomk:0/raw/raw", "mstopk:0/eliasfano/fp16"])
def test_ratio_zero_is_refused_by_every_front_end(spec):
    with pytest.raises(dr.ConfigError, match="ratio 0 sends nothing"):
        Engine(SoloTransport(), dr.Compressor.from_spec(spec))
    with pytest.raises(dr.ConfigError, match="ratio 0 sends nothing"):
        dr.DeepReduceState(compressor=spec)
    with pytest.raises(dr.ConfigError, match="ratio 0 sends nothing"):
        dr.UpdateSync([("w", torch.nn.Parameter(torch.zeros(4)))], spec, transport=SoloTransport())


def test_the_smallest_density_still_keeps_an_element():
    engine = Engine(SoloTransport(), dr.Compressor(ratio=1e-9, value="raw"), min_numel=0)
    engine.reduce(torch.randn(1000)).wait()
    assert engine.stats()["kept"] == 1


def test_bloom_fpr_that_costs_more_than_raw_indices_is_refused():
    with pytest.raises(dr.ConfigError, match="larger than raw int32 indices"):
        dr.Compressor.from_spec("topk:0.01/bloom:fpr=1e-9/fp16")
    dr.Compressor.from_spec("topk:0.01/bloom:fpr=1e-6/fp16")  # 20 hashes, 28.9 bits per index: allowed
    # The default rate stays below raw indices at any density.
    assert default_fpr(1, 10**9) >= 2.0**-22


# --- failed collectives -------------------------------------------------------------------


class DeadPeer(SoloTransport):
    """A transport whose peer is gone: the ``fail`` operation raises as gloo does."""

    def __init__(self, fail: str) -> None:
        self.fail = fail

    def allgather_sizes(self, nbytes: int) -> list[int]:
        if self.fail == "sizes":
            raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")
        return [nbytes]

    def allgather_async(self, payload, sizes):
        if self.fail == "gather":
            future = torch.futures.Future()
            future.set_exception(RuntimeError("Timed out waiting 10000ms for recv operation to complete"))
            return future
        return super().allgather_async(payload, sizes)

    def allreduce_async(self, tensor):
        if self.fail == "allreduce":
            raise RuntimeError("Connection reset by peer")
        return super().allreduce_async(tensor)


@pytest.mark.parametrize("fail, what", [("sizes", "exchanging payload sizes"), ("gather", "the all-gather"),
                                        ("allreduce", "the dense allreduce")])
def test_a_failed_collective_names_bucket_and_step(fail, what):
    engine = Engine(DeadPeer(fail), dr.Compressor(ratio=0.01), min_numel=0 if fail != "allreduce" else 10**6,
                    check=False, size_exchange="always" if fail == "sizes" else "auto")
    engine.step = 7
    message = rf"deepreduce: bucket 'layer3' at step 7: {what} failed \(a peer died.*\): .*(peer|Timed out)"
    with pytest.raises((dr.CommunicationError, RuntimeError), match=message) as raised:
        engine.reduce(torch.randn(3000), key="layer3").wait()
    if fail != "gather":  # raised in the call itself; the gather's comes through its future
        assert isinstance(raised.value, dr.CommunicationError)

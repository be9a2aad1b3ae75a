"""One-process tests of error feedback, stats, the transport and the hook (world size 1)."""

from __future__ import annotations

import logging
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import deepreduce as dr
from deepreduce.engine.memory import ErrorFeedback, memory_dtype
from deepreduce.sparse import SparseGrad
from deepreduce.engine.stats import CommStats, format_stats


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group (reused if this test process already has one)."""
    created = False
    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="deepreduce-test-store-"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


# --- error feedback ----------------------------------------------------------------------


def test_error_feedback_keeps_exactly_what_was_not_sent():
    memory = ErrorFeedback()
    grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    compensated = memory.compensate("b", grad)
    assert torch.equal(compensated, grad) and compensated.data_ptr() != grad.data_ptr()
    sent = SparseGrad(torch.tensor([1, 2]), torch.tensor([-2.0, 2.5]), 4)  # 3.0 sent lossily as 2.5
    memory.update("b", compensated, sent)
    assert torch.equal(memory.residual("b"), torch.tensor([1.0, 0.0, 0.5, 0.5]))
    again = memory.compensate("b", torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(again, torch.tensor([2.0, 1.0, 1.5, 1.5]))
    assert torch.equal(grad, torch.tensor([1.0, -2.0, 3.0, 0.5]))  # the input is untouched


def test_error_feedback_conserves_the_gradient_sum():
    """sum of sent + final residual == sum of gradients, for a lossy top-k pipeline."""
    memory = ErrorFeedback()
    compressor = dr.Compressor(0.1, "topk", "eliasfano", "fp16")
    gen = torch.Generator().manual_seed(0)
    total_grad, total_sent = torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    for step in range(20):
        grad = torch.randn(1000, generator=gen)
        total_grad += grad.double()
        compensated = memory.compensate(0, grad)
        sent = compressor.compress_detailed(compensated, step=step).sent
        total_sent += sent.to_dense().double()
        memory.update(0, compensated, sent)
    assert torch.allclose(total_sent + memory.residual(0).double(), total_grad, atol=1e-4)
    assert memory.residual(0).abs().sum() > 0


def test_error_feedback_disabled_keeps_nothing():
    memory = ErrorFeedback(enabled=False)
    compensated = memory.compensate(0, torch.ones(4))
    memory.update(0, compensated, SparseGrad(torch.tensor([0]), torch.tensor([1.0]), 4))
    assert memory.residual(0) is None
    assert torch.equal(memory.compensate(0, torch.ones(4)), torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_keep_fp32_residuals(dtype):
    memory = ErrorFeedback()
    grad = torch.full((8,), 1e-3, dtype=dtype)
    compensated = memory.compensate(0, grad)
    assert compensated.dtype == torch.float32 == memory_dtype(dtype)
    memory.update(0, compensated, SparseGrad(torch.tensor([0]), grad[:1], 8))
    residual = memory.residual(0)
    assert residual.dtype == torch.float32 and residual[0] == 0 and residual[1] == grad[1].float()


def test_residual_restarts_when_the_bucket_changes_shape():
    memory = ErrorFeedback()
    memory.update(0, memory.compensate(0, torch.ones(4)), SparseGrad(torch.tensor([0]), torch.tensor([1.0]), 4))
    assert torch.equal(memory.compensate(0, torch.ones(6)), torch.ones(6))  # old residual dropped
    assert memory.residual(0) is None


def test_dense_update_leaves_only_rounding():
    memory = ErrorFeedback()
    compensated = memory.compensate(0, torch.tensor([1.0, 1e-4]))
    memory.update_dense(0, compensated, compensated.to(torch.float16))
    assert memory.residual(0)[0] == 0
    small = torch.tensor(1e-4)
    assert memory.residual(0)[1] == small - small.half().float() != 0


def test_momentum_correction_masks_sent_velocity():
    memory = ErrorFeedback(momentum=0.5)
    c1 = memory.compensate(0, torch.tensor([1.0, 1.0]))
    memory.update(0, c1, SparseGrad(torch.tensor([0]), torch.tensor([1.0]), 2))
    # velocity: [0 (masked), 1]; next: u = 0.5*u + g = [1, 1.5]; + residual [0, 1]
    assert torch.equal(memory.compensate(0, torch.tensor([1.0, 1.0])), torch.tensor([1.0, 2.5]))
    with pytest.raises(ValueError, match="momentum"):
        ErrorFeedback(momentum=1.0)


def test_error_feedback_state_dict_round_trip():
    memory = ErrorFeedback(momentum=0.9)
    memory.update(3, memory.compensate(3, torch.arange(5.0)), SparseGrad(torch.tensor([4]), torch.tensor([4.0]), 5))
    restored = ErrorFeedback(momentum=0.9)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.residual(3), memory.residual(3))
    assert torch.equal(restored.velocities[3], memory.velocities[3])
    with pytest.raises(ValueError, match="residuals"):
        restored.load_state_dict({"velocities": {}})


# --- stats -----------------------------------------------------------------------------------


def test_stats_ratio_and_round_trip():
    stats = CommStats()
    stats.add(steps=2, dense_bytes=4000, sent_bytes=100, payload_bytes=96, kept=24, numel=1000, compressed_buckets=2)
    d = stats.as_dict()
    assert d["ratio"] == 40 and d["density"] == 0.024 and d["bits_per_kept"] == 32
    restored = CommStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.as_dict() == d
    assert "ratio 40.0x" in format_stats(d)
    with pytest.raises(ValueError, match="unknown fields"):
        restored.load_state_dict({"bogus": 1})
    assert CommStats().as_dict()["ratio"] == 1.0


# --- state configuration -------------------------------------------------------------------


def test_state_rejects_bad_configuration():
    with pytest.raises(dr.ConfigError, match="ratio 0 sends nothing"):
        dr.DeepReduceState(compressor="topk:0/eliasfano/fp16")
    with pytest.raises(dr.ConfigError, match="nonfinite must be one of"):
        dr.DeepReduceState(nonfinite="ignore")
    with pytest.raises(dr.ConfigError, match="start_iter must be a non-negative int"):
        dr.DeepReduceState(start_iter=-1)
    with pytest.raises(dr.ConfigError, match="granularity must be one of"):
        dr.DeepReduceState(granularity="layer")
    with pytest.raises(dr.ConfigError, match="momentum"):
        dr.DeepReduceState(momentum=1.0)
    with pytest.raises(dr.ConfigError, match="seed"):
        dr.DeepReduceState(compressor=dr.Compressor(seed=1), seed=2)
    with pytest.raises(dr.ConfigError, match="compressor"):
        dr.DeepReduceState(compressor=42)
    with pytest.raises(dr.ConfigError, match="min_numel"):
        dr.DeepReduceState(min_numel=-1)
    state = dr.DeepReduceState(compressor="randomk:0.1/raw/raw", seed=7)
    assert state.seed == 7 and state.compressor.seed == 7


# --- transport and hook in a one-rank group ---------------------------------------------------


def test_torch_transport_one_rank(group):
    from deepreduce.comm import transport_class

    transport = transport_class("torch")()
    assert (transport.rank, transport.world_size) == (0, 1)
    payload = torch.arange(13, dtype=torch.uint8)
    [back] = transport.allgather_varlen(payload)
    assert torch.equal(back, payload)
    assert transport.allgather_bytes(b"spec") == [b"spec"]
    assert transport.allgather_sizes(5) == [5]
    with pytest.raises(ValueError, match="sizes"):
        transport.allgather_async(payload, [7])
    t = torch.ones(3)
    assert torch.equal(transport.allreduce_(t), torch.ones(3))
    transport.barrier()


class _FailedWork:
    """A collective that failed, as gloo reports a dead peer: its future holds the error."""

    def get_future(self) -> torch.futures.Future:
        future = torch.futures.Future()
        future.set_exception(RuntimeError("Connection closed by peer [10.0.0.2]:29500"))
        return future


@pytest.mark.parametrize("call", ["allgather", "allreduce", "allreduce_staged", "broadcast"])
def test_torch_transport_failed_collective_fails_its_future(group, monkeypatch, call):
    """A collective whose peer died fails the transport's future with its error; before,
    the continuation ignored it and handed on the untouched buffers (an all-gather's
    uninitialised memory then failed to decode as a 'message from rank 0')."""
    from deepreduce.comm import torch_dist

    transport = torch_dist.TorchTransport()
    failed = lambda *args, **kwargs: _FailedWork()  # noqa: E731
    monkeypatch.setattr(torch_dist, "_all_gather_single", failed)
    monkeypatch.setattr(torch_dist.dist, "all_reduce", failed)
    monkeypatch.setattr(torch_dist.dist, "broadcast", failed)
    payload = torch.arange(13, dtype=torch.uint8)
    future = {
        "allgather": lambda: transport.allgather_async(payload, [13]),
        "allreduce": lambda: transport.allreduce_async(torch.ones(4)),
        "allreduce_staged": lambda: transport.allreduce_async(torch.ones(8)[::2]),  # staged through a copy
        "broadcast": lambda: transport.broadcast_async(payload, 0),
    }[call]()
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        future.wait()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _recording(hook, log):
    """A hook that records each bucket's input, its parameters' segments and its reduced result."""

    def recorded(state, bucket):
        step, before = state.step, bucket.buffer().clone()
        segments = [(seg.name, seg.offset, seg.numel) for seg in state.segments(bucket)]

        def keep(fut):
            log.append((step, segments, before, fut.value().clone()))
            return fut.value()

        return hook(state, bucket).then(keep)

    return recorded


class _SometimesUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.u, self.c = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor, use_u: bool) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(h + self.u(h) if use_u else h)


@pytest.mark.parametrize("granularity", ["tensor", "bucket"])
def test_unused_parameter_keeps_its_residual(group, granularity):
    """find_unused_parameters: on steps where no rank uses ``u``, DDP leaves its gradient
    None and discards its averaged slot, so the slot must not carry u's residual. What u
    receives over the run plus what is still held equals the gradients it had: nothing
    lost."""
    model = _SometimesUnused()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.01)
    state = dr.DeepReduceState(compressor="topk:0.05/eliasfano/raw", start_iter=1, min_numel=100, stats_every=0,
                               granularity=granularity, named_parameters=model.named_parameters())
    ddp.register_comm_hook(state, dr.deepreduce_hook)
    reference = _SometimesUnused()  # the same parameters, never stepped: its gradients are u's raw ones
    gen = torch.Generator().manual_seed(1)
    received = torch.zeros_like(model.u.weight)
    raw = torch.zeros_like(model.u.weight)
    for step in range(9):
        use_u = step < 3 or step == 8  # trains, then unused on every rank for 5 steps, then trains again
        x = torch.randn(16, 64, generator=gen)
        model.zero_grad(set_to_none=True)
        ddp(x, use_u).pow(2).mean().backward()
        assert (model.u.weight.grad is None) == (not use_u)
        reference.zero_grad()
        reference(x, use_u).pow(2).mean().backward()
        if use_u and step >= 1:  # step 0 is dense
            received += model.u.weight.grad
            raw += reference.u.weight.grad
        if step == 7:  # five unused steps later the residual is what it was after step 2
            torch.testing.assert_close(received + state.memory.residual("u.weight").reshape_as(raw), raw)
    held = state.memory.residual("u.weight").reshape_as(received)
    assert held.abs().sum() > 0 and received.abs().sum() > 0
    torch.testing.assert_close(received + held, raw, rtol=1e-5, atol=1e-6)


def test_held_names_keep_residual_and_velocity_through_update_and_restore():
    memory = ErrorFeedback(momentum=0.5)
    parts = (("a", 3), ("b", 2))
    first = memory.compensate("bucket", torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), parts)
    memory.update("bucket", first, SparseGrad(torch.tensor([0]), torch.tensor([1.0]), 5))
    residual, velocity = memory.residuals["bucket"].clone(), memory.velocities["bucket"].clone()
    for finish in ("update", "update_dense", "restore"):
        memory.hold(["b"])
        compensated = memory.compensate("bucket", torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]), parts)
        memory.hold(())
        assert torch.equal(compensated[3:], torch.zeros(2))  # b's residual and velocity stay out of the step
        if finish == "update":
            memory.update("bucket", compensated, SparseGrad(torch.tensor([1, 4]), torch.tensor([2.5, 0.0]), 5))
        elif finish == "update_dense":
            memory.update_dense("bucket", compensated, compensated.clone())
        else:
            memory.restore("bucket", compensated)
        assert torch.equal(memory.residuals["bucket"][3:], residual[3:]), finish
        assert torch.equal(memory.velocities["bucket"][3:], velocity[3:]), finish
        residual, velocity = memory.residuals["bucket"].clone(), memory.velocities["bucket"].clone()


@pytest.mark.parametrize("granularity", ["tensor", "bucket"])
def test_hook_one_rank_sends_sparse_and_conserves(group, granularity):
    """World size 1: after start_iter each compressed segment (a parameter, or the whole
    bucket) keeps at most k nonzeros, and sum(reduced) + residual == sum(raw gradients)
    per parameter (error feedback loses nothing, also across DDP's bucket rebuild with
    one top-k per bucket); small parameters pass unchanged per tensor."""
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = dr.DeepReduceState(compressor="topk:0.05/eliasfano/raw", start_iter=2, min_numel=100, stats_every=0,
                               granularity=granularity)
    log: list = []
    ddp.register_comm_hook(state, _recording(dr.deepreduce_hook, log))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        opt.zero_grad()
        ddp(torch.randn(16, 64, generator=gen)).pow(2).mean().backward()
        opt.step()
    stats = state.stats()
    assert stats["steps"] == 8 and stats["compressed_buckets"] > 0 and stats["ratio"] > 1
    compressed = [(segments, raw, out) for step, segments, raw, out in log if step >= 2 and raw.numel() >= 100]
    assert len(compressed) == stats["compressed_buckets"]
    raw_sum: dict = {}
    out_sum: dict = {}
    small = 0
    for segments, raw, out in compressed:
        if granularity == "bucket" and len(segments) > 1:
            assert int(torch.count_nonzero(out)) <= max(1, round(0.05 * out.numel()))
        for name, offset, numel in segments:
            raw_part, out_part = raw[offset : offset + numel], out[offset : offset + numel]
            if granularity == "bucket" and len(segments) > 1:
                raw_sum[name] = raw_sum.get(name, 0) + raw_part.double()
                out_sum[name] = out_sum.get(name, 0) + out_part.double()
                small += numel < 100
                continue
            if numel < 100:
                assert torch.equal(raw_part, out_part)
                small += 1
                continue
            assert int(torch.count_nonzero(out_part)) <= max(1, round(0.05 * numel))
            raw_sum[name] = raw_sum.get(name, 0) + raw_part.double()
            out_sum[name] = out_sum.get(name, 0) + out_part.double()
    assert raw_sum and small > 0
    for name in raw_sum:
        residual = state.memory.residual(name).double()
        assert torch.allclose(out_sum[name] + residual, raw_sum[name], atol=1e-6)


def test_hook_one_rank_lossless_full_ratio_is_identity(group):
    """ratio 1.0 with lossless codecs: the hook hands back exactly the gradient."""
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = dr.DeepReduceState(compressor="topk:1.0/zstd/raw", min_numel=0, stats_every=0, dense_fallback=False)
    log: list = []
    ddp.register_comm_hook(state, _recording(dr.deepreduce_hook, log))
    for _ in range(4):
        model.zero_grad()
        ddp(torch.randn(8, 64)).sum().backward()
    assert state.stats()["compressed_buckets"] > 0
    for _, _, raw, out in log:
        assert torch.equal(raw, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hook_puts_half_precision_on_the_wire(group, dtype):
    """A half-precision bucket travels as half-precision values (the compensated fp32
    gradient is rounded to the bucket's dtype before it is compressed)."""
    model = _model().to(dtype)
    ddp = DDP(model)
    state = dr.DeepReduceState(compressor="topk:0.01/eliasfano/raw", start_iter=2, min_numel=0, stats_every=0,
                               granularity="bucket")
    ddp.register_comm_hook(state, dr.deepreduce_hook)
    for _ in range(3):  # two dense warm-up steps, then one compressed
        ddp(torch.randn(8, 64, dtype=dtype)).float().sum().backward()
    assert state.stats()["compressed_buckets"] == 1
    numel = sum(p.numel() for p in model.parameters())
    k = round(0.01 * numel)
    payload = state.stats()["payload_bytes"] - 16  # one framed entry
    # header, Elias-Fano index (< 2 + log2(d/k) bits) and 2-byte values; fp32 values would add 2k bytes
    assert 2 * k <= payload - 64 < 2 * k + k * (2 + (numel // k).bit_length()) / 8 + 16


def test_hook_logs_stats_periodically(group, caplog):
    model = _model()
    ddp = DDP(model)
    state = dr.DeepReduceState(compressor="topk:0.1/eliasfano/fp16", min_numel=0, stats_every=2)
    ddp.register_comm_hook(state, dr.deepreduce_hook)
    with caplog.at_level(logging.INFO, logger="deepreduce"):
        for _ in range(4):
            ddp(torch.randn(4, 64)).sum().backward()
    lines = [r.getMessage() for r in caplog.records if r.name == "deepreduce"]
    assert len(lines) == 2 and "step 4" in lines[-1] and "ratio" in lines[-1]


def test_state_dict_round_trip_continues_identically(group):
    """Save the hook state mid-run, restore it into a fresh state and model: the next
    steps match the uninterrupted run bit for bit."""

    def run(steps, state, model, opt, gen):
        ddp = DDP(model, bucket_cap_mb=0.01)
        ddp(torch.zeros(1, 64)).sum().backward()  # settle DDP's bucket layout first
        model.zero_grad()
        ddp.register_comm_hook(state, dr.deepreduce_hook)
        for _ in range(steps):
            opt.zero_grad()
            ddp(torch.randn(16, 64, generator=gen)).pow(2).mean().backward()
            opt.step()

    def fresh():
        model = _model()
        state = dr.DeepReduceState(compressor="topk:0.05/eliasfano/fp16", min_numel=100, stats_every=0)
        return model, state, torch.optim.SGD(model.parameters(), lr=0.05), torch.Generator().manual_seed(1)

    model_a, state_a, opt_a, gen_a = fresh()
    run(10, state_a, model_a, opt_a, gen_a)

    model_b, state_b, opt_b, gen_b = fresh()
    run(5, state_b, model_b, opt_b, gen_b)
    saved = (state_b.state_dict(), {k: v.clone() for k, v in model_b.state_dict().items()}, gen_b.get_state())
    assert saved[0]["step"] == 5 and saved[0]["memory"]["residuals"]

    model_c, state_c, opt_c, gen_c = fresh()
    state_c.load_state_dict(saved[0])
    model_c.load_state_dict(saved[1])
    gen_c.set_state(saved[2])
    run(5, state_c, model_c, opt_c, gen_c)  # plain SGD: no optimizer state to carry
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    assert state_c.step == 10 and state_c.stats()["steps"] == state_a.stats()["steps"]
    for key, residual in state_a.memory.residuals.items():
        assert torch.equal(residual, state_c.memory.residual(key))
    with pytest.raises(ValueError, match="state dict"):
        state_c.load_state_dict({"format": 99})


def test_state_pickles_and_the_copy_trains_on_identically(group):
    """A pickled state carries its configuration, residuals, step and stats (what
    Lightning's ddp_spawn and other process launchers need): the unpickled copy, given
    the parameter names again, continues exactly as the original does."""

    def steps(ddp, opt, gen, n):
        for _ in range(n):
            opt.zero_grad()
            ddp(torch.randn(16, 64, generator=gen)).pow(2).mean().backward()
            opt.step()

    model_a = _model()
    state_a = dr.DeepReduceState(compressor="topk:0.05/eliasfano/fp16", min_numel=100, stats_every=0,
                                 named_parameters=model_a.named_parameters())
    ddp_a = DDP(model_a, bucket_cap_mb=0.01)
    ddp_a.register_comm_hook(state_a, dr.deepreduce_hook)
    opt_a, gen_a = torch.optim.SGD(model_a.parameters(), lr=0.05), torch.Generator().manual_seed(2)
    steps(ddp_a, opt_a, gen_a, 4)

    state_b = pickle.loads(pickle.dumps(state_a))
    assert state_b.describe() == state_a.describe() and state_b.step == 4
    assert state_b.stats() == state_a.stats() and state_b.stats()["compressed_buckets"] > 0
    large = {name for name, p in model_a.named_parameters() if p.numel() >= 100}
    assert {name for key in state_b.memory.residuals for name in (key if isinstance(key, tuple) else (key,))} == large
    assert all(state_b.memory.residual(name) is not None for name in large)
    for name, residual in state_a.memory.residuals.items():
        assert torch.equal(residual, state_b.memory.residual(name))

    unnamed = DDP(_model(), bucket_cap_mb=0.01)
    unnamed.register_comm_hook(pickle.loads(pickle.dumps(state_a)), dr.deepreduce_hook)
    with pytest.raises(Exception, match=r"name_parameters\(model.named_parameters\(\)\)"):
        unnamed(torch.randn(2, 64)).sum().backward()

    model_b = _model()
    model_b.load_state_dict(model_a.state_dict())
    state_b.name_parameters(model_b.named_parameters())
    ddp_b = DDP(model_b, bucket_cap_mb=0.01)
    ddp_b.register_comm_hook(state_b, dr.deepreduce_hook)
    opt_b, gen_b = torch.optim.SGD(model_b.parameters(), lr=0.05), torch.Generator().manual_seed(2)
    gen_b.set_state(gen_a.get_state())
    steps(ddp_a, opt_a, gen_a, 4)
    steps(ddp_b, opt_b, gen_b, 4)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert state_b.step == state_a.step == 8


def test_state_with_an_explicit_group_says_why_it_cannot_be_pickled(group):
    state = dr.DeepReduceState(process_group=group)
    with pytest.raises(TypeError, match="process_group=None"):
        pickle.dumps(state)


def test_waiting_on_a_future_gives_back_the_deepreduce_error_its_callback_raised():
    """torch hands a future's waiter a RuntimeError holding only the message of what a
    callback raised; the front ends' waits give back the deepreduce error itself, through
    chained callbacks too, and leave other errors as they are."""
    from deepreduce.errors import DecodeError, wait

    source = torch.futures.Future()

    def fails(_: torch.futures.Future) -> None:
        raise DecodeError("segment 'w': payload from rank 1: bad checksum\nsecond line")

    chained = source.then(fails).then(lambda done: done.value())
    source.set_result(None)
    with pytest.raises(DecodeError) as caught:
        wait(chained)
    assert str(caught.value) == "segment 'w': payload from rank 1: bad checksum\nsecond line"
    other = torch.futures.Future()
    other.set_exception(RuntimeError("connection reset"))
    with pytest.raises(RuntimeError, match="^connection reset$"):
        wait(other)


def test_a_sparse_gradient_is_refused_by_name(group):
    """DDP passes an nn.Embedding(sparse=True)'s gradient as a sparse bucket; the hook says
    so instead of failing on the buffer's shape."""
    model = torch.nn.Sequential(torch.nn.Embedding(200, 32, sparse=True), torch.nn.Linear(32, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(dr.DeepReduceState(start_iter=0, named_parameters=model.named_parameters()), dr.deepreduce_hook)
    with pytest.raises(dr.ConfigError, match=r"deepreduce_hook: 0\.weight has a sparse gradient .*sparse=False"):
        ddp(torch.randint(0, 200, (4, 5))).sum().backward()

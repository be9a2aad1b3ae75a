"""The cheap paths of a compressed step: the one-pass finite check, reused selection
buffers, the batched sum of W payloads, and (below) the size-exchange-free gather."""

from __future__ import annotations

import pickle

import pytest
import torch

import deepreduce as dr
from deepreduce.engine.messages import all_finite, sum_in_rank_order
from deepreduce.sparse import SparseGrad
from deepreduce.comm import completed
from deepreduce.engine import Engine
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
@pytest.mark.parametrize("k", [500, 3000])  # all ranks' parts concatenated, and (large) added one by one
def test_batched_sum_is_bitwise_the_per_rank_sum(dtype, world, k):
    """One index_add_ over all ranks' pairs equals one index_add_ per rank, in rank order."""
    gen = torch.Generator().manual_seed(world)
    numel = 20_000
    accumulate = torch.float32 if dtype == torch.float16 else dtype
    parts = []
    for _ in range(world):
        indices = torch.sort(torch.randperm(numel, generator=gen)[:k]).values  # overlaps across ranks
        values = (torch.randn(k, generator=gen) * 10 ** torch.randint(-3, 4, (k,), generator=gen)).to(dtype)
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


# --- sizes known before encoding ---------------------------------------------------------------

SIZED = ["raw/raw", "raw/fp16", "eliasfano/fp16", "eliasfano/bf16", "eliasfano/raw", "eliasfano/uniform:bits=1",
         "eliasfano/uniform:bits=3", "eliasfano/uniform:bits=4,block=7", "eliasfano/qsgd", "eliasfano/qsgd:bits=3,block=5",
         "bloom:policy=leftmost/fp16", "bloom:policy=p2,fpr=0.01/uniform:bits=2", "raw/uniform:bits=8,block=1000"]
UNSIZED = ["topk:0.01/rle/fp16", "topk:0.01/zstd/fp16", "topk:0.01/eliasfano/zstd", "topk:0.01/eliasfano/polyfit",
           "topk:0.01/bloom:policy=p0/fp16", "threshold:t=0.5/eliasfano/fp16", "dgc:0.01/eliasfano/fp16"]


def _sized_cases():
    gen = torch.Generator().manual_seed(11)
    for i, codecs in enumerate(SIZED):
        for numel in (1, 7, 100, 1000, 4099, 70_001):
            for density in (0.0005, 0.01, 0.3, 1.0):
                dtype = (torch.float32, torch.float16, torch.bfloat16, torch.float64)[int(torch.randint(4, (1,), generator=gen))]
                yield codecs, numel, density, dtype, ("topk", "randomk", "mstopk")[(i + numel) % 3]


@pytest.mark.parametrize("codecs", SIZED)
def test_declared_payload_sizes_match_the_payloads(codecs):
    """For every numel/k/dtype: exact sizes are the payload's size, bounds are never exceeded."""
    gen = torch.Generator().manual_seed(hash(codecs) % 1000)
    for case_codecs, numel, density, dtype, sparsifier in _sized_cases():
        if case_codecs != codecs:
            continue
        compressor = dr.Compressor.from_spec(f"{sparsifier}:{density}/{codecs}")
        declared = compressor.payload_size(numel, dtype)
        assert declared is not None, (codecs, numel, density)
        nbytes, exact = declared
        assert exact == (not codecs.startswith("eliasfano")), codecs
        for layout in ("spread", "clustered"):
            x = torch.randn(numel, generator=gen).to(dtype)
            if layout == "clustered":  # the largest elements at the start: the worst case for gap coding
                x[: max(1, numel // 50)] *= 1000
            payload = compressor.compress(x, step=0)
            if exact:
                assert payload.numel() == nbytes, (codecs, numel, density, dtype)
            else:
                assert payload.numel() <= nbytes, (codecs, numel, density, dtype)


@pytest.mark.parametrize("codecs", ["strided/fp16", "strided/uniform:bits=4", "strided/raw"])
def test_cyclic_payloads_fit_their_declared_size_at_every_step(codecs):
    """cyclic keeps one of two counts depending on the step's offset: the declared size is
    the larger payload, every step's payload fits, and one of them fills it."""
    gen = torch.Generator().manual_seed(5)
    for numel in (1, 3, 7, 100, 1001, 4099):
        for density in (0.125, 0.3, 1.0):
            compressor = dr.Compressor.from_spec(f"cyclic:{density}/{codecs}")
            nbytes, exact = compressor.payload_size(numel, torch.float32)
            x = torch.randn(numel, generator=gen)
            sizes = {compressor.compress(x, step=step).numel() for step in range(round(1 / density) + 1)}
            assert max(sizes) == nbytes, (codecs, numel, density, sizes)
            assert not exact or sizes == {nbytes}, (codecs, numel, density, sizes)


@pytest.mark.parametrize("spec", UNSIZED)
def test_data_dependent_payloads_declare_no_size(spec):
    assert dr.Compressor.from_spec(spec).payload_size(10_000, torch.float32) is None


def test_eliasfano_bound_holds_for_extreme_index_sets():
    from deepreduce.codecs import CodecContext
    from deepreduce.codecs.index.eliasfano import EliasFanoIndexCodec, size_bound

    codec = EliasFanoIndexCodec()
    for numel, indices in ((1000, torch.arange(10)), (1000, torch.arange(990, 1000)), (1000, torch.arange(0, 1000, 100)),
                           (10**6, torch.tensor([0, 10**6 - 1])), (10**6, torch.arange(0, 10**6, 3)), (5, torch.arange(5))):
        part = codec.encode(indices, CodecContext(numel, torch.float32, torch.device("cpu")))
        assert part.data.numel() <= size_bound(numel, indices.numel()), (numel, indices[:3])


# --- the gather without a size exchange -------------------------------------------------------

@pytest.mark.parametrize("spec", ["topk:0.01/eliasfano/fp16", "topk:0.02/eliasfano/uniform:bits=4", "mstopk:0.01/raw/qsgd",
                                  "topk:0.01/bloom:policy=p2/bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_computed_sizes_skip_the_exchange_with_the_same_result(spec, dtype):
    from deepreduce.apps.bench.profile import LoopbackTransport
    from deepreduce.engine import Segment

    gen = torch.Generator().manual_seed(5)
    layout = [Segment("a", 0, 30_000), Segment("b", 30_000, 500), Segment("c", 30_500, 9_500)]  # b travels raw
    grads = [torch.randn(40_000, generator=gen).to(dtype) for _ in range(4)]
    results, stats = {}, {}
    for exchange in ("auto", "always"):
        engine = Engine(LoopbackTransport(3), dr.Compressor.from_spec(spec), min_numel=1000, check=False, size_exchange=exchange)
        outs = []
        for grad in grads:
            outs.append(engine.reduce(grad.clone(), layout).wait().clone())
            engine.end_step()
        results[exchange], stats[exchange] = outs, engine.stats()
    for a, b in zip(results["auto"], results["always"]):
        assert torch.equal(bits(a), bits(b))
    assert stats["auto"]["size_exchanges"] == 0 and stats["always"]["size_exchanges"] == len(grads)
    assert stats["auto"]["compressed_buckets"] == stats["always"]["compressed_buckets"] == len(grads)
    assert stats["auto"]["sent_bytes"] >= stats["always"]["sent_bytes"]  # padded to the computed width
    assert stats["auto"]["payload_bytes"] == stats["always"]["payload_bytes"]


def test_data_dependent_sizes_still_exchange_and_a_failure_reaches_every_rank():
    from deepreduce.apps.bench.profile import LoopbackTransport
    from deepreduce.engine.presized import FAILED, failed_message, flag_of

    engine = Engine(LoopbackTransport(2), dr.Compressor.from_spec("topk:0.01/zstd/fp16"), min_numel=0, check=False)
    engine.reduce(torch.randn(5000)).wait()
    assert engine.stats()["size_exchanges"] == 1
    assert flag_of(failed_message(64, torch.device("cpu"))) == FAILED

    class PeerFails(LoopbackTransport):
        """Rank 1 fails to compress from the second gather on (its message is the flag)."""

        gathers = 0

        def allgather_async(self, payload, sizes):
            self.gathers += 1
            if self.gathers == 1:
                return super().allgather_async(payload, sizes)
            return completed([payload, failed_message(payload.numel(), payload.device)])

    engine = Engine(PeerFails(2), dr.Compressor(0.01), min_numel=0, check=False)
    engine.reduce(torch.randn(5000), key="w").wait()  # the residual exists from here on
    engine.end_step()
    residual = engine.memory.residual("w").clone()
    with pytest.raises(RuntimeError, match=r"DeepReduceError: deepreduce: rank 1 failed to compress bucket 'w' at step 1"):
        engine.reduce(torch.randn(5000), key="w").wait()
    assert torch.allclose(engine.memory.residual("w"), residual, rtol=0, atol=1e-6)  # rolled back
    assert engine.stats()["size_exchanges"] == 0


def test_own_compression_failure_joins_the_gather_and_fails_through_the_future():
    """Raising in the call would end a DDP backward pass before this rank's next buckets'
    collectives while the other ranks issue them; so the rank joins the gather with the
    failure flag, and its own error surfaces where the future is waited on."""
    from deepreduce.apps.bench.profile import LoopbackTransport
    from deepreduce.engine.presized import FAILED, flag_of

    class Recording(LoopbackTransport):
        sent: list = []

        def allgather_async(self, payload, sizes):
            self.sent.append(flag_of(payload))
            return super().allgather_async(payload, sizes)

    compressor = dr.Compressor(0.01)
    engine = Engine(Recording(2), compressor, min_numel=0, check=False)

    def failing(tensor, **kwargs):
        raise ValueError("injected codec failure")

    compressor.compress_detailed = failing
    future = engine.reduce(torch.randn(5000), key="w")  # no raise here
    with pytest.raises(RuntimeError, match="injected codec failure"):
        future.wait()
    assert Recording.sent == [FAILED] and engine.stats()["size_exchanges"] == 0

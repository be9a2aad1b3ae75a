"""Per-tensor budgets in one payload (``Engine(pack_tensors=True)``, the default): adjacent
large tensors of a bucket travel as one payload while each keeps its own top-k budget.
What the receivers decode must be what per-tensor payloads give -- bit for bit where no
value block spans two tensors -- for fewer bytes, and every rank must merge alike."""

from __future__ import annotations

import struct

import pytest
import torch

import deepreduce as dr
from deepreduce.apps.bench.profile import LoopbackTransport
from deepreduce.engine import Engine, Segment
from deepreduce.engine.presized import NONFINITE
from deepreduce.sparsifiers import SelectContext, get_sparsifier, select_with
from deepreduce.sparsifiers import blocktopk as blocktopk_module
from deepreduce.sparsifiers.blocktopk import blocktopk_parts

# value blocks of 16 values = one block of positions: each tensor's values are coded alike packed or not
BLOCKS = "blocktopk:0.2,block=16/blocks:block=16/uniform:bits=1,block=16,scale=bf16"


def _per_part(name: str, config: dict, flat: torch.Tensor, ratio: float, parts: list[int]) -> torch.Tensor:
    entry, pieces, offset = get_sparsifier(name), [], 0
    for numel in parts:
        chosen = select_with(entry, config, flat[offset:offset + numel], ratio, SelectContext())
        pieces.append(chosen.indices + offset)
        offset += numel
    return torch.cat(pieces)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("host", [True, False])  # numpy's ranking on the CPU, and torch's (other devices)
def test_blocktopk_of_parts_is_blocktopk_of_each_part(seed, host, monkeypatch):
    """One sort over every part's blocks picks, per part, exactly the blocks blocktopk
    picks from the part alone: descending score, ties to the lower block, NaN first, a
    short last block, a part kept whole."""
    if not host:
        monkeypatch.setattr(blocktopk_module, "host_array", lambda tensor: None)
    gen = torch.Generator().manual_seed(seed)
    block = 16
    parts = [block * int(n) for n in torch.randint(1, 12, (4,), generator=gen)] + [int(torch.randint(1, 60, (1,), generator=gen))]
    flat = torch.randn(sum(parts), generator=gen)
    flat[: 2 * block] = 1.0  # tied blocks
    flat[-3] = float("nan") if seed % 2 else flat[-3]
    if seed % 3 == 0:
        flat[block * 3: block * 5] = 0.0  # tied zero blocks
    config = {"block": block, "norm": "l1" if seed % 2 else "l2"}
    for ratio in (0.05, 0.3, 0.9):
        want = _per_part("blocktopk", config, flat, ratio, parts)
        got = select_with(get_sparsifier("blocktopk"), config, flat, ratio, SelectContext(), parts)
        assert torch.equal(got.indices, want), (parts, ratio)
        torch.testing.assert_close(got.values, flat[want], rtol=0, atol=0, equal_nan=True)


def test_blocktopk_parts_called_directly_keeps_each_budget():
    magnitude = torch.arange(64, dtype=torch.float32)  # later blocks score higher
    chosen = blocktopk_parts(magnitude, [32, 32], [8, 16], SelectContext(), block=8)
    assert torch.equal(chosen, torch.cat([torch.arange(24, 32), torch.arange(48, 64)]))


@pytest.mark.parametrize("seed", range(4))
def test_topk_of_parts_is_topk_of_each_part(seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [int(n) for n in torch.randint(1, 50_000, (5,), generator=gen)]
    flat = torch.randn(sum(parts), generator=gen)
    for ratio in (0.01, 0.3):
        want = _per_part("topk", {}, flat, ratio, parts)
        got = select_with(get_sparsifier("topk"), {}, flat, ratio, SelectContext(), parts)
        assert torch.equal(got.indices, want)


def test_parts_are_refused_where_they_cannot_be_kept_apart():
    entry = get_sparsifier("blocktopk")
    with pytest.raises(ValueError, match="do not tile"):
        select_with(entry, {"block": 8, "norm": "l1"}, torch.randn(40), 0.5, SelectContext(), [16, 16])
    with pytest.raises(dr.ConfigError, match="cannot select parts"):  # a part that is not whole blocks
        select_with(entry, {"block": 8, "norm": "l1"}, torch.randn(40), 0.5, SelectContext(), [20, 20])
    with pytest.raises(dr.ConfigError, match="cannot select parts"):
        select_with(get_sparsifier("randomk"), {}, torch.randn(40), 0.5, SelectContext(), [20, 20])
    assert dr.Compressor.from_spec(BLOCKS).packs_parts([32, 48, 64])
    assert dr.Compressor.from_spec(BLOCKS.replace("uniform:bits=1,block=16,scale=bf16", "raw")).packs_parts([32, 48, 7])
    # ... but 7 values coded on their own would make a narrower block than in a shared payload
    assert not dr.Compressor.from_spec(BLOCKS).packs_parts([32, 48, 7])
    assert not dr.Compressor.from_spec(BLOCKS).packs_parts([30, 48])
    assert not dr.Compressor.from_spec("randomk:0.1").packs_parts([30, 48])
    assert not dr.Compressor.from_spec("topk:0.1").packs_parts([30])
    # What receivers decode would change: qsgd's random stream, a Bloom filter over both tensors.
    assert dr.Compressor.from_spec("topk:0.1/eliasfano/bf16").packs_parts([30, 48])
    assert dr.Compressor.from_spec("topk:0.1/eliasfano/fp16").packs_parts([30, 48])  # an exponent per tensor
    assert not dr.Compressor.from_spec("topk:0.1/eliasfano/qsgd").packs_parts([3000, 4800])
    assert not dr.Compressor.from_spec("topk:0.1/bloom/bf16").packs_parts([3000, 4800])
    # uniform blocks restart at each tensor: every tensor must keep at least a block of values
    assert dr.Compressor.from_spec("topk:0.1/eliasfano/uniform:bits=1,block=128").packs_parts([3000, 4800])
    assert not dr.Compressor.from_spec("topk:0.1/eliasfano/uniform:bits=1,block=128").packs_parts([3000, 1000])
    assert not dr.Compressor.from_spec(BLOCKS.replace("block=16,", "block=32,")).packs_parts([32, 48])


def _engine(world: int, spec: str, **options) -> Engine:
    return Engine(LoopbackTransport(world), dr.Compressor.from_spec(spec), **options)


def _segments(sizes: list[int]) -> list[Segment]:
    out, offset = [], 0
    for i, numel in enumerate(sizes):
        out.append(Segment(f"t{i}", offset, numel))
        offset += numel
    return out


@pytest.mark.parametrize("spec, small", [(BLOCKS, "cyclic:0.125/strided/fp16"), ("topk:0.05/eliasfano/bf16", None),
                                         ("topk:0.05/eliasfano/raw", "topk:1/strided/uniform:bits=8")])
@pytest.mark.parametrize("size_exchange", ["auto", "always"])
def test_packed_tensors_average_as_per_tensor_payloads_do(spec, small, size_exchange):
    """Over steps of error feedback, packed and per-tensor payloads give bitwise the same
    averages and residuals (these value codecs code each tensor's values alike either way),
    the packed message is smaller, and its width is computed without a size exchange."""
    sizes = [256, 512, 48, 1024, 320, 40, 33]  # large, large, small, large, large, small, small
    segments = _segments(sizes)
    engines = [_engine(3, spec, min_numel=64, small_compressor=small, pack_tensors=pack,
                      size_exchange=size_exchange, dense_fallback=False) for pack in (False, True)]
    packed = engines[1]._segments(torch.zeros(sum(sizes)), segments, 0)
    assert len(engines[0]._segments(torch.zeros(sum(sizes)), segments, 0)) == 7
    # the four large tensors gather into one payload across the small one between them
    assert [(seg.numel, seg.spans) for seg in packed] == [(2112, (0, 256, 816, 1840)), (48, None), (40, None), (33, None)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(sum(sizes), generator=gen)
        outs = [e.reduce(grad.clone(), segments).wait().clone() for e in engines]
        for e in engines:
            e.end_step()
        assert torch.equal(outs[0], outs[1])
        for seg in segments:
            residuals = [e.memory.residual(seg.name) for e in engines]
            assert (residuals == [None, None] if seg.numel < 64 and small is None
                    else torch.equal(residuals[0], residuals[1])), seg.name
    per_tensor, packed = (e.stats() for e in engines)
    assert packed["payload_bytes"] < per_tensor["payload_bytes"]
    assert packed["kept"] == per_tensor["kept"]
    if size_exchange == "auto":
        assert packed["size_exchanges"] == 0


class _OtherRankNotFinite(LoopbackTransport):
    """Loopback ranks, rank 1 reporting a non-finite bucket while ``not_finite`` is set."""

    not_finite = False

    def allgather_sizes(self, nbytes: int) -> list[int]:
        sizes = super().allgather_sizes(nbytes)
        return [sizes[0], NONFINITE] if self.not_finite else sizes


@pytest.mark.parametrize("case", ["dense fallback", "momentum", "non-finite step", "non-finite step, momentum"])
def test_gathered_tensors_keep_every_path_of_the_step_as_per_tensor_payloads_do(case):
    """The paths that write a gathered segment back or undo its compensation (the dense
    fallback, DGC momentum correction, a non-finite step's restore) give bitwise what
    per-tensor payloads give, residuals and velocities included."""
    sizes = [256, 48, 512, 40, 1024]  # small tensors between the large ones: one gathered payload
    segments = _segments(sizes)
    spec = "topk:1.0/eliasfano/raw" if case == "dense fallback" else "topk:0.05/eliasfano/raw"
    options = {"momentum": 0.9} if "momentum" in case else {}
    transports = [_OtherRankNotFinite(2) for _ in range(2)]
    engines = [Engine(transport, dr.Compressor.from_spec(spec), min_numel=64, pack_tensors=pack,
                      size_exchange="always", dense_fallback=case == "dense fallback", **options)
               for transport, pack in zip(transports, (False, True))]
    assert engines[1]._segments(torch.zeros(sum(sizes)), segments, 0)[0].spans == (0, 304, 856)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        grad = torch.randn(sum(sizes), generator=gen)
        for transport in transports:  # this rank compensates, then hears that rank 1 is not finite
            transport.not_finite = case.startswith("non-finite") and step == 2
        outs = [e.reduce(grad.clone(), segments).wait().clone() for e in engines]
        for e in engines:
            e.end_step()
        assert torch.equal(outs[0], outs[1])
        for seg in segments:
            if seg.numel >= 64:
                residuals = [e.memory.residual(seg.name) for e in engines]
                assert torch.equal(residuals[0], residuals[1]), (step, seg.name)
    stats = [e.stats() for e in engines]
    if case == "dense fallback":
        assert stats[0]["dense_fallbacks"] == stats[1]["dense_fallbacks"] == 4
    if case.startswith("non-finite"):
        assert stats[0]["nonfinite_buckets"] == stats[1]["nonfinite_buckets"] == 1
    if "momentum" in options:
        velocities = [e.memory.velocities for e in engines]
        joined = torch.cat([velocities[0][f"t{i}"] for i in (0, 2, 4)])
        assert torch.equal(joined, velocities[1][("t0", "t2", "t4")])


def test_packing_follows_the_density_of_the_step():
    """``uniform`` blocks restart at each tensor, so its values pack while every tensor
    keeps at least a block of them: during a density warm-up the counts fall step by step,
    and the layout changes -- alike on every rank, with the same averages as per-tensor
    payloads and residuals kept per tensor across the change."""
    spec = "topk:0.125/eliasfano/uniform:bits=1,block=32"
    sizes = [1000, 200]  # the second keeps 118, 70, 42, then 25 values: under a block of 32
    engines = [_engine(2, spec, min_numel=64, dense_fallback=False, density_warmup=4, pack_tensors=pack)
               for pack in (False, True)]
    merged = []
    for seed in range(6):
        grad = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed))
        merged.append(len(engines[1]._segments(grad, _segments(sizes), 0)) == 1)
        outs = [e.reduce(grad.clone(), _segments(sizes)).wait().clone() for e in engines]
        assert torch.equal(outs[0], outs[1])
        for e in engines:
            e.end_step()
        for name in ("t0", "t1"):
            assert torch.equal(engines[0].memory.residual(name), engines[1].memory.residual(name))
    assert merged == [True, True, True, False, False, False]
    assert engines[1].stats()["payload_bytes"] < engines[0].stats()["payload_bytes"]


def test_large_tensors_of_a_packing_sparsifier_merge_across_small_ones():
    sizes = [256, 512, 48, 1024, 320]
    big = torch.zeros(sum(sizes))
    merged = _engine(2, BLOCKS, min_numel=64)._segments(big, _segments(sizes), 0)
    assert [(s.offset, s.numel, s.part_numels, s.spans) for s in merged] == [
        (0, 2112, (256, 512, 1024, 320), (0, 256, 816, 1840)), (768, 48, None, None)]
    assert merged[0].name == ("t0", "t1", "t3", "t4") and merged[0].per_part
    views = merged[0].views(torch.arange(float(sum(sizes))))
    assert [(v[0].item(), v.numel()) for v in views] == [(0, 256), (256, 512), (816, 1024), (1840, 320)]
    adjacent = _engine(2, BLOCKS, min_numel=64)._segments(torch.zeros(1088), _segments([256, 512, 320]), 0)
    assert [(s.numel, s.spans) for s in adjacent] == [(1088, None)]  # parts that follow each other: one view
    # a multi-part segment (one budget) between large tensors keeps its entry too
    layout = [Segment("a", 0, 256), Segment(("b", "c"), 256, 128, parts=(("b", 64), ("c", 64))), Segment("d", 384, 512)]
    assert [(s.name, s.spans) for s in _engine(2, BLOCKS, min_numel=64)._segments(torch.zeros(896), layout, 0)] == [
        (("a", "d"), (0, 384)), (("b", "c"), None)]
    for engine in (_engine(2, "randomk:0.1", min_numel=64),  # random: not per part
                   _engine(2, BLOCKS, min_numel=64, pack_tensors=False),
                   _engine(2, "blocktopk:0.2,block=16/blocks:block=16/fp16", min_numel=64, scheme="shared_index")):
        assert engine._segments(big, _segments(sizes), 0) == _segments(sizes)
    unaligned = [256, 500, 48, 512, 320]  # 500 is not whole blocks of 16: it ends a run, the next starts anew
    assert [(s.numel, s.spans) for s in _engine(2, BLOCKS, min_numel=64)._segments(
        torch.zeros(1636), _segments(unaligned), 0)] == [(756, None), (48, None), (832, None)]


def test_packing_is_part_of_the_agreed_configuration():
    on = _engine(2, BLOCKS)
    off = _engine(2, BLOCKS, pack_tensors=False)
    assert on.describe()["pack_tensors"] is True and off.describe()["pack_tensors"] is False
    with pytest.raises(dr.ConfigError, match="pack_tensors must be True or False"):
        _engine(2, BLOCKS, pack_tensors="yes")


def test_residuals_saved_per_tensor_resume_into_packed_payloads():
    """A checkpoint taken with per-tensor payloads resumes with packed ones (residuals are
    kept per tensor either way) and continues exactly as the per-tensor run does."""
    sizes = [256, 512, 320]
    segments = _segments(sizes)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(sum(sizes), generator=gen) for _ in range(4)]
    straight = _engine(2, BLOCKS, min_numel=64, pack_tensors=False)
    first = _engine(2, BLOCKS, min_numel=64, pack_tensors=False)
    want = []
    for grad in grads:
        want.append(straight.reduce(grad.clone(), segments).wait().clone())
        straight.end_step()
    for grad in grads[:2]:
        first.reduce(grad.clone(), segments).wait()
        first.end_step()
    resumed = _engine(2, BLOCKS, min_numel=64)
    resumed.load_state_dict(first.state_dict())
    for grad, expected in zip(grads[2:], want[2:]):
        assert torch.equal(resumed.reduce(grad.clone(), segments).wait(), expected)
        resumed.end_step()
    again = _engine(2, BLOCKS, min_numel=64, pack_tensors=False)
    again.load_state_dict(resumed.state_dict())  # and back: saved per tensor
    assert set(again.memory.state_dict()["residuals"]) >= {"t0", "t1", "t2"}


@pytest.mark.parametrize("value", ["uniform:bits=1,block=32", "uniform:bits=1,block=32,scale=bf16",
                                   "uniform:bits=3,block=32", "uniform:bits=8,block=32,scale=bf16", "fp16", "bf16",
                                   "raw"])
def test_a_packed_payload_decodes_to_the_per_tensor_payloads(value):
    """``compress_detailed(parts=...)`` with a per-element top-k: the tensors' values
    decode exactly as their own payloads would (``uniform`` blocks restart at each
    tensor, its runs written in the payload), and the payload's size is the one
    ``payload_size`` computes ahead."""
    spec = f"topk:0.07/eliasfano/{value}"
    compressor = dr.Compressor.from_spec(spec)
    parts = [1000, 457, 2048, 600]  # 70, 32, 143, 42 values: blocks of 32 span no tensor
    assert compressor.packs_parts(parts)
    flat = torch.randn(sum(parts), generator=torch.Generator().manual_seed(7))
    flat[1000:1457] *= 1e-6  # a tensor of far smaller values: fp16 gives it its own exponent
    packed = compressor.compress_detailed(flat, step=0, key="run", parts=parts)
    decoded = dr.decode(packed.payload)
    assert torch.equal(decoded.indices, packed.sent.indices) and torch.equal(decoded.values, packed.sent.values)
    offset, pieces = 0, []
    for numel in parts:
        alone = dr.decode(compressor.compress_detailed(flat[offset:offset + numel], step=0, key="t").payload)
        pieces.append((alone.indices + offset, alone.values))
        offset += numel
    assert torch.equal(decoded.indices, torch.cat([i for i, _ in pieces]))
    assert torch.equal(decoded.values, torch.cat([v for _, v in pieces]))
    size, exact = compressor.payload_size(flat.numel(), flat.dtype, parts)
    assert packed.payload.numel() <= size and (packed.payload.numel() == size or not exact)


def test_runs_shorter_than_a_block_still_decode_within_the_codes_bound():
    """Called directly with tensors that keep fewer values than a block, the payload is
    valid and its 1-bit code errs less than the values' norm, per tensor."""
    compressor = dr.Compressor.from_spec("topk:0.05/eliasfano/uniform:bits=1,block=128")
    parts = [400, 3000, 100]  # 20, 150 and 5 values
    assert not compressor.packs_parts(parts)
    flat = torch.randn(3500, generator=torch.Generator().manual_seed(2))
    result = compressor.compress_detailed(flat, step=0, parts=parts)
    decoded = dr.decode(result.payload)
    assert torch.equal(decoded.values, result.sent.values)
    for lo, hi in ((0, 400), (400, 3400), (3400, 3500)):
        mine = (decoded.indices >= lo) & (decoded.indices < hi)
        truth = flat[decoded.indices[mine]]
        assert (decoded.values[mine] - truth).norm() < truth.norm()
        assert decoded.values[mine].abs().unique().numel() <= -(-int(mine.sum()) // 128)  # one scale per block


@pytest.mark.parametrize("mutate, match", [
    (lambda params: params[:-4], "runs need"),
    (lambda params: params[:-4] + struct.pack("<I", 7), "runs of"),
    (lambda params: params[:6] + struct.pack("<I", 1000) + params[10:], "runs need"),
])
def test_malformed_runs_are_refused(mutate, match):
    from deepreduce.codecs import CodecContext
    from deepreduce.codecs.value.uniform import UniformValueCodec

    codec = UniformValueCodec(bits=1, block=8)
    ctx = CodecContext(100, torch.float32, torch.device("cpu"), runs=(10, 5, 9))
    part = codec.encode(torch.randn(24), ctx)
    assert len(part.params) == 10 + 4 * 3
    assert UniformValueCodec.decode(part.data, part.params, 24, ctx).numel() == 24
    with pytest.raises(dr.DecodeError, match=match):
        UniformValueCodec.decode(part.data, mutate(part.params), 24, ctx)
    with pytest.raises(dr.DecodeError, match="expected"):  # the scales of 2 + 1 + 2 blocks, not 3
        UniformValueCodec.decode(part.data[:-4], part.params, 24, ctx)


def test_update_mode_gathers_large_tensors_and_trains_as_per_tensor():
    """With the small tensors raw (no small compressor) and lying between the large ones,
    the update mode's large tensors still share one payload; the parameters after a few
    exchanges are bitwise those of per-tensor payloads, for fewer bytes."""
    def run(pack: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 700),
                                    torch.nn.Linear(700, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sync = dr.UpdateSync(model.named_parameters(), "topk:0.1/eliasfano/uniform:bits=1,block=32", keep_unsent=True,
                             min_numel=1024, transport=LoopbackTransport(2), broadcast=False, pack_tensors=pack)
        for step in range(4):
            torch.manual_seed(100 + step)
            model(torch.randn(8, 40)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            sync.step()
        return model, sync

    packed, packed_sync = run(True)
    apart, apart_sync = run(False)
    names = [seg.name for seg in packed_sync.groups[0].segments]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    sent = packed_sync.engine._segments(torch.zeros(packed_sync.groups[0].numel), packed_sync.groups[0].segments, 0)
    assert len(sent) == 6  # three weights in one payload, five raw small tensors
    assert sent[0].name == ("0.weight", "2.weight", "3.weight") and sent[0].spans is not None
    for a, b in zip(packed.parameters(), apart.parameters()):
        assert torch.equal(a, b)
    assert packed_sync.stats()["payload_bytes"] < apart_sync.stats()["payload_bytes"]


@pytest.mark.parametrize("mutate, match", [
    (lambda params: params[:2], "expected 0 or a run count"),
    (lambda params: params[:-4], "bytes for 3 runs"),
    (lambda params: struct.pack("<I", 1) + params[4:8], "bytes for 1 runs"),
    (lambda params: params[:-4] + struct.pack("<I", 2), "runs of"),
])
def test_malformed_fp16_runs_are_refused(mutate, match):
    from deepreduce.codecs import CodecContext
    from deepreduce.codecs.value.fp16 import Float16ValueCodec

    values = torch.cat([torch.randn(10), torch.randn(5) * 1e-5, torch.randn(9) * 1e4])
    ctx = CodecContext(100, torch.float32, torch.device("cpu"), runs=(10, 5, 9))
    part = Float16ValueCodec().encode(values, ctx)
    decoded = Float16ValueCodec.decode(part.data, part.params, 24, ctx)
    assert torch.allclose(decoded, values, rtol=1e-3, atol=0)  # each run in float16's range
    with pytest.raises(dr.DecodeError, match=match):
        Float16ValueCodec.decode(part.data, mutate(part.params), 24, ctx)
    bad_shift = torch.cat([struct_bytes(500), part.data[4:]])
    with pytest.raises(dr.DecodeError, match="scale exponent"):
        Float16ValueCodec.decode(bad_shift, part.params, 24, ctx)


def struct_bytes(number: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(struct.pack("<i", number)), dtype=torch.uint8)


def test_a_wrapped_compressor_without_parts_keeps_one_payload_per_tensor():
    """A user's wrapper of ``compress_detailed`` that does not take ``parts`` keeps working:
    the engine then sends one payload per tensor."""
    engine = _engine(2, BLOCKS, min_numel=64, dense_fallback=False)
    inner = engine.compressor.compress_detailed
    calls = []

    def wrapped(tensor, *, step=None, key=0, timer=None):
        calls.append(key)
        return inner(tensor, step=step, key=key)

    engine.compressor.compress_detailed = wrapped
    grad = torch.randn(1088, generator=torch.Generator().manual_seed(4))
    reference = _engine(2, BLOCKS, min_numel=64, dense_fallback=False)
    assert torch.equal(engine.reduce(grad.clone(), _segments([256, 512, 320])).wait(),
                       reference.reduce(grad.clone(), _segments([256, 512, 320])).wait())
    assert calls == ["t0", "t1", "t2"]

"""The blocktopk sparsifier and the blocks index codec: selection, exact round trips,
sizes known ahead, clear errors."""

from __future__ import annotations

import struct

import pytest
import torch

import deepreduce as dr
from deepreduce.codecs import CodecContext, make_index_codec
from deepreduce.codecs.index.blocks import BITMAP, ELIASFANO, BlocksIndexCodec, blocks_of_count
from deepreduce.sparsifiers import blocktopk as blocktopk_module
from deepreduce.sparsifiers import get_sparsifier, target_k

from helpers import bits, reseal, set_header_field

CPU = torch.device("cpu")


def compressor(ratio: float, block: int, value: str = "raw", norm: str = "l1") -> dr.Compressor:
    return dr.Compressor.from_spec(f"blocktopk:{ratio},block={block},norm={norm}/blocks:block={block}/{value}")


def reference_blocks(x: torch.Tensor, block: int, kept: int, norm: str = "l1") -> torch.Tensor:
    """The kept blocks by a plain loop: highest mean score first, lower block on ties."""
    scores = []
    for b in range(-(-x.numel() // block)):
        part = x[b * block : (b + 1) * block].abs().double()
        scores.append(float((part.square() if norm == "l2" else part).mean()))
    order = sorted(range(len(scores)), key=lambda b: (-scores[b], b))[:kept]
    return torch.tensor(sorted(order), dtype=torch.int64)


def positions_of(blocks: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    return torch.tensor([i for b in blocks.tolist() for i in range(b * block, min((b + 1) * block, numel))],
                        dtype=torch.int64)


@pytest.mark.parametrize("numel, ratio, block", [
    (1000, 0.2, 64),     # 15 full blocks and one of 40
    (4096, 0.2, 64),     # whole blocks only
    (4096, 1.0, 64),     # every block
    (4096, 0.001, 64),   # one block (round(4/64) = 0, at least one)
    (50, 0.5, 64),       # one short block: the whole tensor
    (777, 0.3, 1),       # block 1 is per-element top-k
    (10_000, 0.07, 100),
    (1031, 0.5, 128),    # the short last block is 7 elements
])
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("host", [True, False])  # numpy's ranking on the CPU, and torch's (other devices)
def test_selection_keeps_the_top_blocks_and_round_trips(numel, ratio, block, norm, host, monkeypatch):
    if not host:
        monkeypatch.setattr(blocktopk_module, "host_array", lambda tensor: None)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel + block))
    x[: min(numel, block)] *= 3  # a clear winner
    c = compressor(ratio, block, norm=norm)
    result = c.compress_detailed(x)
    kept = min(-(-numel // block), max(1, round(target_k(numel, ratio) / block)))
    expected = positions_of(reference_blocks(x, block, kept, norm), block, numel)
    assert torch.equal(result.sent.indices, expected)
    decoded = dr.decode(result.payload)
    assert torch.equal(decoded.indices, expected)
    assert torch.equal(bits(decoded.values), bits(x[expected]))
    assert decoded.k in c.sparsifier.kept_counts(numel, target_k(numel, ratio), c.sparsifier_config)


def test_the_short_last_block_competes_on_its_mean():
    x = torch.full((130,), 1.0)
    x[128:] = 5.0  # the 2-element last block has the largest mean, not the largest sum
    indices = dr.sparsify(x, 0.3, "blocktopk", block=64).indices  # round(39/64) = 1 block
    assert indices.tolist() == [128, 129]
    x[128:] = 0.5
    assert torch.equal(dr.sparsify(x, 0.3, "blocktopk", block=64).indices, torch.arange(64))  # tie: the lower block


def test_l1_and_l2_rank_blocks_differently():
    x = torch.zeros(128)
    x[0] = 8.0             # block 0: one spike, mean |x| 0.125, mean x^2 1.0
    x[64:] = 0.5           # block 1: flat, mean |x| 0.5, mean x^2 0.25
    assert dr.sparsify(x, 0.5, "blocktopk", block=64, norm="l2").indices[0] == 0
    assert dr.sparsify(x, 0.5, "blocktopk", block=64, norm="l1").indices[0] == 64


def test_selection_is_deterministic_with_ties_and_zeros():
    x = torch.zeros(4096)
    first = dr.sparsify(x, 0.1, "blocktopk", block=32).indices
    assert torch.equal(first, torch.arange(13 * 32))  # all tie: the lowest blocks
    y = torch.randn(4096).round()
    assert torch.equal(dr.sparsify(y, 0.1, "blocktopk", block=32).indices, dr.sparsify(y.clone(), 0.1, "blocktopk", block=32).indices)


@pytest.mark.parametrize("numel, ratio, block", [(100_000, 0.01, 64), (100_000, 0.3, 64), (65_549, 0.2, 32),
                                                 (5000, 0.5, 7), (1, 0.5, 64)])
def test_both_layouts_round_trip_and_the_smaller_is_used(numel, ratio, block):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    result = compressor(ratio, block).compress_detailed(x)
    header = dr.read_header(result.payload)
    _, layout, _, _ = struct.unpack("<IBBQ", header.index_params)
    nblocks = -(-numel // block)
    bitmap = 4 * -(-nblocks // 32)
    assert header.index_nbytes <= bitmap
    assert layout == (ELIASFANO if header.index_nbytes < bitmap else BITMAP)
    assert torch.equal(dr.decode(result.payload).indices, result.sent.indices)


@pytest.mark.parametrize("value", ["raw", "fp16", "uniform:bits=1", "uniform:bits=2,block=64"])
@pytest.mark.parametrize("numel, block", [(16_384, 64), (1000, 64), (65_549, 32), (300, 1), (10, 64), (0, 64)])
def test_computed_size_bounds_the_payload_and_matches_the_gather_width(value, numel, block):
    c = dr.Compressor.from_spec(f"blocktopk:0.2,block={block}/blocks:block={block}/{value}")
    size, exact = c.payload_size(numel, torch.float32)
    for seed in range(3):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
        x[-(numel % block or block):] *= 10 * seed  # seed 0: the short last block loses; later, it wins
        payload = c.compress(x)
        assert payload.numel() <= size
        if exact:
            assert payload.numel() == size
    if numel % block == 0:
        # Whole blocks only: the count is exact, and a bitmap layout is exact too.
        assert len(c.sparsifier.kept_counts(numel, target_k(numel, 0.2), c.sparsifier_config)) == 1


def test_kept_counts_cover_both_cases_of_the_short_last_block():
    entry = get_sparsifier("blocktopk")
    assert entry.kept_counts(1000, 200, {"block": 64, "norm": "l1"}) == (168, 192)  # 3 blocks, or 2 + the 40
    assert entry.kept_counts(1024, 200, {"block": 64, "norm": "l1"}) == (192,)
    assert entry.kept_counts(1000, 1000, {"block": 64, "norm": "l1"}) == (1000,)
    assert entry.kept_counts(1000, 0, {"block": 64, "norm": "l1"}) == (0,)
    assert get_sparsifier("topk").kept_counts(1000, 200, {}) == (200,)


def test_presized_gather_width_holds_every_rank_payload():
    from deepreduce.engine.presized import message_width

    c = compressor(0.2, 64, "uniform:bits=1")
    numels = [1000, 16_384, 130, 65]
    width = message_width(c, numels, torch.float32, 64)
    assert width is not None
    from deepreduce.engine.framing import framed_size

    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        sizes = [c.compress(torch.randn(n, generator=g) * (1 + 50 * (seed % 2) * (torch.arange(n) >= n - 40))).numel()
                 if n >= 64 else 4 * n for n in numels]
        assert framed_size(sizes) <= width


@pytest.mark.parametrize("spec, match", [
    ("blocktopk:0.1,block=0/blocks/raw", "option 'block' must be in"),
    ("blocktopk:0.1,block=-3/blocks/raw", "option 'block' must be in"),
    ("blocktopk:0.1,block=2.5/blocks/raw", "option 'block' must be int"),
    ("blocktopk:0.1,norm=max/blocks/raw", "option 'norm' must be one of"),
    ("blocktopk:1.5/blocks/raw", "ratio must be in"),
    ("blocktopk:-0.1/blocks/raw", "ratio must be in"),
    ("blocktopk:0.1,size=3/blocks/raw", "unknown option"),
    ("blocktopk:0.1/blocks:block=0/raw", "option 'block' must be in"),
])
def test_bad_options_are_config_errors(spec, match):
    with pytest.raises(dr.ConfigError, match=match):
        dr.Compressor.from_spec(spec)


def test_blocks_codec_refuses_index_sets_that_are_not_its_blocks():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    with pytest.raises(dr.ConfigError, match="carries only the index sets of the blocktopk sparsifier"):
        dr.Compressor(0.1, "topk", "blocks", "raw")  # refused when built
    with pytest.raises(dr.ConfigError, match="cannot carry blocktopk's blocks of 32: give both the same block"):
        dr.Compressor.from_spec("blocktopk:0.2,block=32/blocks/raw")  # refused when built
    with pytest.raises(dr.ConfigError, match="whole aligned blocks of 64 positions only"):  # the codec checks what it is handed
        make_index_codec("blocks").encode(torch.arange(0, 1000, 7), CodecContext(1000, torch.float32, CPU))
    dr.decode(dr.Compressor.from_spec("randomk:1/blocks/raw").compress(x))  # every element: whole blocks
    with pytest.raises(dr.ConfigError, match="whole aligned blocks"):  # 64 = 2 blocks of 32, but misaligned
        make_index_codec("blocks", {"block": 32}).encode(torch.arange(16, 80), CodecContext(1000, torch.float32, CPU))
    codec, ctx = make_index_codec("blocks"), CodecContext(1000, torch.float32, CPU)
    holed = torch.cat([torch.arange(0, 70), torch.arange(71, 128), torch.tensor([200])])  # 128 positions, not 2 blocks
    for bad in (torch.cat([torch.arange(64, 128), torch.arange(0, 64)]),  # whole blocks out of order
                holed, torch.arange(0, 104)):  # 104 = a block and the cut last one (960-999), not the next 40
        with pytest.raises(dr.ConfigError, match="whole aligned blocks"):
            codec.encode(bad, ctx)
    last = torch.cat([torch.arange(0, 64), torch.arange(960, 1000)])
    assert torch.equal(type(codec).decode(*_data_params(codec.encode(last, ctx)), 104, ctx), last)
    # A larger multiple of the block is whole blocks of the smaller size too.
    assert torch.equal(dr.decode(dr.Compressor.from_spec("blocktopk:0.2,block=64/blocks:block=32/raw")
                                 .compress(torch.randn(1024))).indices.reshape(-1, 64)[:, 0] % 64, torch.zeros(3, dtype=torch.int64))


def _data_params(encoding):
    return encoding.data, encoding.params


def test_blocks_of_count():
    assert blocks_of_count(1000, 168, 64) == (3, True)
    assert blocks_of_count(1000, 192, 64) == (3, False)
    assert blocks_of_count(1024, 192, 64) == (3, None)
    assert blocks_of_count(1000, 100, 64) is None
    assert blocks_of_count(1000, 1001, 64) is None
    assert blocks_of_count(0, 0, 64) == (0, None)


def _payload(numel=1000, ratio=0.2, block=64, seed=0, boost_last=False):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    if boost_last:
        x[-(numel % block or block):] *= 100
    return compressor(ratio, block).compress(x)


def _with_index_params(payload: torch.Tensor, params: bytes) -> torch.Tensor:
    out = payload.clone()
    out[64 : 64 + len(params)] = torch.frombuffer(bytearray(params), dtype=torch.uint8)
    return reseal(out)


def test_bad_payloads_are_decode_errors():
    good = _payload()  # 1000 elements, 3 blocks of 64: a bitmap of 16 blocks
    header = dr.read_header(good)
    block, layout, low, nbits = struct.unpack("<IBBQ", header.index_params)
    assert (block, layout) == (64, BITMAP)
    cases = [
        (struct.pack("<IBBQ", 0, layout, 0, 0), "block size 0 out of range"),
        (struct.pack("<IBBQ", 64, 7, 0, 0), "unknown layout 7"),
        (struct.pack("<IBBQ", 64, BITMAP, 1, 5), "non-zero Elias-Fano parameters"),
        (struct.pack("<IBBQ", 50, BITMAP, 0, 0), "is not a count of whole 50-blocks"),
        (struct.pack("<IBBQ", 32, BITMAP, 0, 0), "bitmap holds 3 blocks, k=192 needs 6"),
    ]
    for params, match in cases:
        with pytest.raises(dr.DecodeError, match=match):
            dr.decode(_with_index_params(good, params))
    # k that no set of whole blocks has, and a k whose short-last-block flag the ids contradict.
    with pytest.raises(dr.DecodeError):
        dr.decode(set_header_field(good, 24, "<Q", 100))
    ctx = CodecContext(1000, torch.float32, CPU)
    codec = make_index_codec("blocks")
    part = codec.encode(torch.arange(128), ctx)  # blocks 0 and 1
    with pytest.raises(dr.DecodeError, match="last block's presence disagree"):
        BlocksIndexCodec.decode(part.data, part.params, 104, ctx)  # 104 = one full block + the 40-element last one
    # A flipped bitmap bit changes the count.
    flipped = part.data.clone()
    flipped[0] ^= 4
    with pytest.raises(dr.DecodeError, match="bitmap holds 3 blocks"):
        BlocksIndexCodec.decode(flipped, part.params, 128, ctx)
    with pytest.raises(dr.DecodeError, match="has 3 bytes, expected 4"):
        BlocksIndexCodec.decode(part.data[:3], part.params, 128, ctx)
    with pytest.raises(dr.DecodeError, match="parameter block"):
        BlocksIndexCodec.decode(part.data, part.params[:-1], 128, ctx)


def test_elias_fano_layout_errors_are_decode_errors():
    ctx = CodecContext(1_000_000, torch.float32, CPU)
    ids = torch.tensor([3, 900, 15_000])
    indices = (ids.reshape(-1, 1) * 64 + torch.arange(64)).reshape(-1)
    part = make_index_codec("blocks").encode(indices, ctx)
    assert struct.unpack("<IBBQ", part.params)[1] == ELIASFANO
    assert torch.equal(BlocksIndexCodec.decode(part.data, part.params, indices.numel(), ctx), indices)
    with pytest.raises(dr.DecodeError):
        BlocksIndexCodec.decode(part.data[:-4], part.params, indices.numel(), ctx)
    block, layout, low, nbits = struct.unpack("<IBBQ", part.params)
    with pytest.raises(dr.DecodeError):
        BlocksIndexCodec.decode(part.data, struct.pack("<IBBQ", block, layout, low, nbits + 40), indices.numel(), ctx)
    with pytest.raises(dr.DecodeError):
        BlocksIndexCodec.decode(part.data, part.params, indices.numel() + 64, ctx)


def test_empty_and_full_sets():
    ctx = CodecContext(1000, torch.float32, CPU)
    codec = make_index_codec("blocks")
    for indices in (torch.empty(0, dtype=torch.int64), torch.arange(1000), torch.arange(960, 1000)):
        part = codec.encode(indices, ctx)
        assert torch.equal(BlocksIndexCodec.decode(part.data, part.params, indices.numel(), ctx), indices)
    assert codec.encoded_size(1000, 0, torch.float32).data == 0


def test_update_sync_with_block_top_k_on_one_rank():
    from helpers import SoloTransport

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    sync = dr.UpdateSync(model.named_parameters(), compressor="blocktopk:0.25,block=16/blocks:block=16/uniform:bits=1",
                         transport=SoloTransport(), start_iter=0, min_numel=64)
    optimizer = dr.LocalAdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, 64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.step()
    stats = sync.stats()
    sync.finish()
    assert stats["compressed_buckets"] == 3 and stats.get("size_exchanges", 0) == 0  # sizes computed, not exchanged
    assert 0.25 <= stats["density"] < 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_block_top_k_on_gpu_decodes_alike_on_the_cpu():
    cuda = torch.device("cuda")
    numel, block = 100_003, 64
    # Block scales far apart, so rounding differences between devices cannot reorder blocks.
    scale = torch.randperm(-(-numel // block), generator=torch.Generator().manual_seed(5)).double().repeat_interleave(block)[:numel]
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(6)).sign() * (1 + scale)).float()
    c = compressor(0.1, block, "uniform:bits=1")
    on_gpu = c.compress_detailed(x.to(cuda), step=0)
    assert on_gpu.payload.is_cuda and on_gpu.sent.indices.is_cuda
    assert torch.equal(on_gpu.sent.indices.cpu(), c.compress_detailed(x, step=0).sent.indices)
    decoded = dr.decode(on_gpu.payload.cpu())
    assert torch.equal(decoded.indices, on_gpu.sent.indices.cpu())
    assert torch.equal(bits(decoded.values), bits(on_gpu.sent.values.cpu()))
    assert on_gpu.payload.numel() <= c.payload_size(numel, torch.float32)[0]


def test_a_block_longer_than_the_tensor_allocates_only_the_tensor():
    # A payload may carry any block size up to 2**31 - 1; one block longer than the tensor
    # is the whole tensor, and decoding it must not allocate a block's worth of positions.
    codec = make_index_codec("blocks", {"block": 2**31 - 1})
    ctx = CodecContext(14, torch.float32, CPU)
    encoded = codec.encode(torch.arange(14), ctx)
    assert torch.equal(BlocksIndexCodec.decode(encoded.data, encoded.params, 14, ctx), torch.arange(14))

"""On the CPU, bit packing, Elias-Fano and the fp16 value codec run in numpy on the
tensors' memory; elsewhere (CUDA) they run as torch ops. Payloads must be the same
bytes whichever path wrote them, and either path must read the other's. These tests
force the torch path on the CPU (no host view) and compare."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepreduce import _bits
from deepreduce.codecs import CodecContext
from deepreduce.codecs.index import eliasfano
from deepreduce.codecs.index.blocks import expand_blocks
from deepreduce.codecs.value import fp16


def _tensor_path(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setattr(module, "host_array", lambda tensor: None)


def _both(monkeypatch, fn, *args, modules=(_bits,)):
    host = fn(*args)
    with monkeypatch.context() as patch:
        _tensor_path(patch, *modules)
        tensor = fn(*args)
    return host, tensor


@given(count=st.integers(0, 3000), width=st.integers(0, 62), seed=st.integers(0, 2**31))
@settings(max_examples=150, deadline=None)
def test_fixed_width_fields_pack_alike_on_both_paths(count, width, seed):
    monkeypatch = pytest.MonkeyPatch()
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << width, (count,), generator=gen) if width else torch.zeros(count, dtype=torch.int64)
    host, tensor = _both(monkeypatch, _bits.pack_fixed, values, width)
    assert torch.equal(host, tensor)
    assert host.numel() == _bits.fixed_nbytes(count, width)
    unpacked_host, unpacked_tensor = _both(monkeypatch, _bits.unpack_fixed, host, width, count)
    assert torch.equal(unpacked_host, values) and torch.equal(unpacked_tensor, values)


@given(nbits=st.integers(0, 5000), fill=st.floats(0, 1), seed=st.integers(0, 2**31))
@settings(max_examples=150, deadline=None)
def test_bitmaps_pack_and_read_alike_on_both_paths(nbits, fill, seed):
    monkeypatch = pytest.MonkeyPatch()
    gen = torch.Generator().manual_seed(seed)
    positions = torch.nonzero(torch.rand(nbits, generator=gen) < fill).reshape(-1)
    host, tensor = _both(monkeypatch, _bits.pack_bitmap, positions, nbits)
    assert torch.equal(host, tensor) and host.numel() == _bits.packed_nbytes(nbits)
    read_host, read_tensor = _both(monkeypatch, _bits.bitmap_positions, host, nbits)
    assert torch.equal(read_host, positions) and torch.equal(read_tensor, positions)


@given(count=st.integers(0, 3000), fill=st.floats(0, 1), seed=st.integers(0, 2**31))
@settings(max_examples=100, deadline=None)
def test_sign_bits_pack_from_bools_as_one_bit_fields(count, fill, seed):
    # The 1-bit uniform codec packs its sign mask without widening it: the same bytes.
    monkeypatch = pytest.MonkeyPatch()
    mask = torch.rand(count, generator=torch.Generator().manual_seed(seed)) < fill
    host, tensor = _both(monkeypatch, _bits.pack_bool, mask)
    assert torch.equal(host, tensor) and torch.equal(host, _bits.pack_fixed(mask.to(torch.int64), 1))
    read_host, read_tensor = _both(monkeypatch, _bits.bitmap_to_bool, host, count)
    assert torch.equal(read_host, mask) and torch.equal(read_tensor, mask)


@pytest.mark.parametrize("values, ascending", [
    ([], True), ([5], True), ([1, 2, 9], True), ([1, 1, 2], False), ([3, 2], False), ([-4, 0, 7, 6], False),
])
def test_ascending_and_equality_checks_agree_on_both_paths(values, ascending):
    monkeypatch = pytest.MonkeyPatch()
    tensor = torch.tensor(values, dtype=torch.int64)
    assert _both(monkeypatch, _bits.strictly_ascending, tensor) == (ascending, ascending)
    assert _both(monkeypatch, _bits.strictly_ascending, torch.tensor(values[::-1] * 2, dtype=torch.int64)[::2]) \
        == ((ascending,) * 2 if len(values) < 2 else (False, False))  # a strided view, reversed
    same = _both(monkeypatch, _bits.same_values, tensor, tensor.clone())
    other = torch.cat([tensor[:-1], tensor[-1:] + 1]) if len(values) else torch.zeros(1, dtype=torch.int64)
    assert same == (True, True) and _both(monkeypatch, _bits.same_values, tensor, other) == (False, False)


@pytest.mark.parametrize("ids, block, numel", [
    ([], 64, 1000), ([0, 3, 15], 64, 1000), ([2, 7], 128, 1000), ([0], 4096, 1000), ([1, 2, 5], 1, 6),
])
def test_block_ids_expand_alike_on_both_paths(ids, block, numel):
    monkeypatch = pytest.MonkeyPatch()
    block_ids = torch.tensor(ids, dtype=torch.int64)
    host, tensor = _both(monkeypatch, expand_blocks, block_ids, block, numel)
    expected = [i for b in ids for i in range(b * block, min((b + 1) * block, numel))]
    assert host.dtype == tensor.dtype == torch.int64 and host.tolist() == tensor.tolist() == expected


@pytest.mark.parametrize("width", [1, 13])  # 1: numpy's own bit unpacking
def test_host_unpacking_reads_misaligned_slices(width):
    # Payload parts start at any byte of a message; numpy views them without a copy.
    values = torch.randint(0, 1 << width, (777,), generator=torch.Generator().manual_seed(0))
    packed = _bits.pack_fixed(values, width)
    for offset in range(1, 8):
        shifted = torch.cat([torch.zeros(offset, dtype=torch.uint8), packed])[offset:]
        unpacked = _bits.unpack_fixed(shifted, width, 777)
        assert unpacked.dtype == torch.int64 and torch.equal(unpacked, values)


@pytest.mark.parametrize("numel", [1, 64, 70_000, 3_000_000])
@pytest.mark.parametrize("layout", ["scattered", "run", "clustered"])
@pytest.mark.parametrize("k", [1, 37, 5_000, 70_000])
def test_eliasfano_writes_the_same_bytes_on_both_paths(monkeypatch, numel, layout, k):
    # Both paths pick the width with the fewest bits (the first on ties): the same bytes.
    k = min(k, numel)
    gen = torch.Generator().manual_seed(numel + k)
    if layout == "scattered":
        indices = torch.sort(torch.randperm(numel, generator=gen)[:k]).values
    elif layout == "run":
        indices = torch.arange(k) + (numel - k) // 2
    else:
        indices = torch.unique(torch.randint(0, max(1, numel // 50), (k,), generator=gen) * 49 % numel)
    host, tensor = _both(monkeypatch, eliasfano.encode_ascending, indices, numel)
    assert torch.equal(host[0], tensor[0]) and host[1:] == tensor[1:]
    args = (host[0], host[1], host[2], indices.numel(), numel)
    decoded_host, decoded_tensor = _both(monkeypatch, eliasfano.decode_ascending, *args)
    assert torch.equal(decoded_host, indices) and torch.equal(decoded_tensor, indices)


_SPECIAL = [math.inf, -math.inf, math.nan, 0.0, -0.0, 1e300, -1e-300, 65504.0, 6e-8]


@given(count=st.integers(0, 300), dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       log_scale=st.floats(-40, 40), special=st.lists(st.sampled_from(_SPECIAL), max_size=3), seed=st.integers(0, 2**31))
@settings(max_examples=300, deadline=None)
def test_fp16_values_encode_alike_on_both_paths(count, dtype, log_scale, special, seed):
    monkeypatch = pytest.MonkeyPatch()
    values = torch.randn(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 10.0 ** log_scale
    values[: len(special)] = torch.tensor(special[:count], dtype=torch.float64)
    values = values.to(dtype)
    codec = fp16.Float16ValueCodec()
    ctx = CodecContext(count, dtype, torch.device("cpu"))
    host, tensor = _both(monkeypatch, lambda v: codec.encode(v, ctx).data, values, modules=(fp16,))
    assert torch.equal(host, tensor)
    decoded = codec.decode(host, b"", count, ctx)
    shift = int(host[:4].view(torch.int32))
    expected = (host[4:].view(torch.float16).double() * 2.0 ** -shift).to(dtype)
    assert torch.equal(decoded.isnan(), expected.isnan())
    assert torch.equal(decoded[~decoded.isnan()], expected[~expected.isnan()])

"""The ``bloom`` index codec: hashing, the positive set, the four policies, validation."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepreduce as dr
from deepreduce import _bits
from deepreduce.codecs import CodecContext, _hashing
from deepreduce.codecs.index import bloom
from deepreduce.codecs.index.bloom import BloomIndexCodec

from helpers import reseal

POLICIES = ["p0", "leftmost", "random", "p2"]
CPU = torch.device("cpu")


def _ctx(d: int, seed: int = 7) -> CodecContext:
    return CodecContext(d, torch.float32, CPU, seed)


def _random_indices(d: int, r: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(d, generator=gen)[:r]).values


def _filter_of(data: torch.Tensor, params: bytes) -> tuple[torch.Tensor, int, int, int]:
    r, nbits, nhashes, _ = struct.unpack("<QQBB", params)
    return _bits_table(data, nbits), r, nbits, nhashes


def _bits_table(data: torch.Tensor, nbits: int) -> torch.Tensor:
    bits = np.unpackbits(data.numpy(), bitorder="little")[:nbits]
    return torch.from_numpy(bits.astype(bool))


# --- hashing --------------------------------------------------------------------------


def test_hashes_match_a_pure_python_reference():
    key = _hashing.hash_key(123456789, 42)
    positions = [0, 1, 2, 12345, (1 << 31) - 1, (1 << 32) - 1, 1 << 32, (1 << 32) + 5, (3 << 33) + 77, (1 << 36) - 1]
    nhashes, nbits = 7, 1_000_003
    got = _hashing.all_bits(torch.tensor(positions), key, nhashes, nbits)
    for row, x in zip(got.tolist(), positions):
        k1, k2 = _hashing.high_keys(key, x >> 32)
        h1 = _hashing.fmix32_reference((x & 0xFFFFFFFF) ^ k1)
        h2 = _hashing.fmix32_reference(h1 ^ k2)
        assert row == [(((h1 + i * h2) & 0xFFFFFFFF) * nbits) >> 32 for i in range(nhashes)]


def test_policy_random_words_match_a_pure_python_reference():
    # Bloom's random/p2 choices are replayed by every decoder, on whatever device it runs:
    # the words are plain integer arithmetic (no torch.Generator, whose CPU and CUDA
    # streams differ), pinned here to a reference that knows nothing of devices.
    rng_seed, salt = 0x1234_5678_9ABC, 77
    got = _hashing.random_words(rng_seed, salt, 1000, "cpu").tolist()
    k1, k2 = _hashing.high_keys(_hashing.hash_key(rng_seed, salt), 0)
    assert got == [_hashing.fmix32_reference(_hashing.fmix32_reference(i ^ k1) ^ k2) for i in range(1000)]
    assert len(set(got)) == 1000 and got != _hashing.random_words(rng_seed, salt + 1, 1000, "cpu").tolist()


def test_random_subset_is_uniform_and_ascending():
    counts = torch.zeros(20)
    for seed in range(2000):
        pick = _hashing.random_subset(seed, 3, 20, 5, "cpu")
        assert pick.numel() == 5 and bool((pick[1:] > pick[:-1]).all())
        counts[pick] += 1
    # Each position is picked with probability 1/4: 500 of 2000 draws, sd ~19.4.
    assert float((counts - 500).abs().max()) < 6 * 19.4
    assert torch.equal(_hashing.random_subset(1, 2, 7, 9, "cpu"), torch.arange(7))


def test_query_matches_brute_force_over_several_chunks(monkeypatch):
    monkeypatch.setattr(bloom, "_CHUNK", 1 << 12)  # many chunks, the last one partial
    d, r, nhashes = 50_000 + 17, 400, 4
    nbits = bloom.filter_bits(r, nhashes, d)
    key = _hashing.hash_key(99, 1)
    table = torch.zeros(nbits, dtype=torch.bool)
    table[_hashing.all_bits(_random_indices(d, r, 0), key, nhashes, nbits).reshape(-1)] = True
    every = _hashing.all_bits(torch.arange(d), key, nhashes, nbits)
    expected = torch.nonzero(table[every].all(dim=1)).reshape(-1)
    assert torch.equal(bloom.query(table, d, key, nhashes), expected)
    assert torch.equal(bloom.query(table, d, key, nhashes, stop_after=100)[:100], expected[:100])
    with pytest.raises(bloom._TooManyPositives):
        bloom.query(table, d, key, nhashes, limit=expected.numel() - 1)


def test_filter_size_and_hash_count_follow_the_formulas():
    assert bloom.hash_count(0.1) == 4 and bloom.hash_count(1e-3) == 10 and bloom.hash_count(0.5) == 1
    assert bloom.filter_bits(1000, 10, 100_000) == math.ceil(10 * 1000 / math.log(2))
    assert bloom.filter_bits(1, 30, 1 << 30) == (1 << 30) // bloom.POSITIONS_PER_BIT  # floor of d / 2^12
    enc = BloomIndexCodec().encode(_random_indices(100_000, 1000, 1), _ctx(100_000))
    r, nbits, nhashes, policy = struct.unpack("<QQBB", enc.params)
    assert (r, nhashes, policy) == (1000, 10, 0)  # default fpr = 0.1 * r / d = 1e-3
    assert nbits == math.ceil(10 * 1000 / math.log(2)) and enc.data.numel() == 4 * ((nbits + 31) // 32)


# --- both sides, every policy -----------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sender_and_receivers_derive_the_same_set_and_aligned_values(policy, dtype):
    d = 40_000
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(d, generator=gen).to(dtype)
    c = dr.Compressor(0.02, "topk", "bloom", "raw", policy=policy, seed=11)
    out = c.compress_detailed(x, step=5)
    first, second = dr.decode(out.payload), dr.decode(out.payload.clone())
    for got in (first, second):
        assert torch.equal(got.indices, out.sent.indices) and torch.equal(got.values, out.sent.values)
        assert got.values.dtype == dtype
    # Every value is the dense tensor's value at its own index, false positives included.
    assert torch.equal(first.values, x[first.indices])
    r = out.selected
    # The sparsifier's top-k (ties broken its own way: fp16 has many), and it is one.
    true_top = dr.sparsify(x, 0.02).indices
    outside = torch.ones(d, dtype=torch.bool)
    outside[true_top] = False
    assert true_top.numel() == r and x[true_top].float().abs().min() >= x[outside].float().abs().max()
    if policy == "p0":
        assert first.k > r and bool(torch.isin(true_top, first.indices).all())
        assert not bool(torch.isin(first.indices, true_top).all())  # there are false positives
    else:
        assert first.k == r
    if policy == "leftmost":
        p0 = dr.decode(dr.Compressor(0.02, "topk", "bloom", "raw", policy="p0", seed=11).compress(x, step=5))
        assert torch.equal(first.indices, p0.indices[:r])


@pytest.mark.parametrize("policy", ["random", "p2"])
def test_random_choices_follow_the_seed(policy):
    x = torch.randn(30_000, generator=torch.Generator().manual_seed(0))
    picks = {}
    for seed in (1, 2):
        c = dr.Compressor(0.05, "topk", "bloom", "raw", policy=policy, fpr=0.05, seed=seed)
        picks[seed] = c.compress_detailed(x, step=3).sent.indices
        again = dr.Compressor(0.05, "topk", "bloom", "raw", policy=policy, fpr=0.05, seed=seed).compress_detailed(x, step=3)
        assert torch.equal(again.sent.indices, picks[seed])
    assert not torch.equal(picks[1], picks[2])


@pytest.mark.parametrize("fpr", [None, 0.01, 0.2])
def test_p0_size_stays_within_the_false_positive_bound(fpr):
    d = 200_000
    codec = BloomIndexCodec(fpr=fpr) if fpr else BloomIndexCodec()
    for seed, r in ((0, 200), (1, 2000), (2, 20_000)):
        enc = codec.encode(_random_indices(d, r, seed), _ctx(d, seed))
        rate = fpr if fpr else bloom.default_fpr(r, d)
        assert r <= enc.indices.numel() <= r + rate * (d - r) + 6 * math.sqrt(rate * d)
        assert bool(torch.isin(_random_indices(d, r, seed), enc.indices).all())


def _certain_members(positives: torch.Tensor, ctx: CodecContext, nhashes: int, nbits: int) -> torch.Tensor:
    """Positives that are alone in some filter bit's conflict set (computed independently)."""
    key = _hashing.hash_key(ctx.rng_seed, bloom._HASH_SALT)
    bits = _hashing.all_bits(positives, key, nhashes, nbits).tolist()
    members: dict[int, set[int]] = {}
    for position, row in zip(positives.tolist(), bits):
        for b in set(row):
            members.setdefault(b, set()).add(position)
    return torch.tensor(sorted({next(iter(s)) for s in members.values() if len(s) == 1}))


@pytest.mark.parametrize("fpr", [None, 0.01, 0.05])
def test_p2_keeps_every_certain_true_positive(fpr):
    d, r = 60_000, 1500
    truth = _random_indices(d, r, 5)
    ctx = _ctx(d, 5)
    kwargs = {"fpr": fpr} if fpr else {}
    chosen = BloomIndexCodec(policy="p2", **kwargs).encode(truth, ctx)
    positives = BloomIndexCodec(policy="p0", **kwargs).encode(truth, ctx).indices
    _, nbits, nhashes, _ = struct.unpack("<QQBB", chosen.params)
    certain = _certain_members(positives, ctx, nhashes, nbits)
    assert certain.numel() > 0 and bool(torch.isin(certain, truth).all())
    assert chosen.indices.numel() == r and bool(torch.isin(certain, chosen.indices).all())
    assert bool(torch.isin(chosen.indices, positives).all())
    # Explaining bits beats picking positives blindly.
    kept = torch.isin(truth, chosen.indices).float().mean().item()
    blind = torch.isin(truth, BloomIndexCodec(policy="random", **kwargs).encode(truth, ctx).indices).float().mean().item()
    assert kept >= blind and (fpr is not None or kept > 0.99)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 5000),
    density=st.floats(0.0, 1.0),
    policy=st.sampled_from(POLICIES),
    fpr=st.one_of(st.none(), st.floats(1e-6, 0.9)),
    seed=st.integers(0, 2**32),
)
def test_round_trip_property(d, density, policy, fpr, seed):
    r = min(d, round(density * d))
    truth = _random_indices(d, r, seed % 1000)
    ctx = _ctx(d, seed)
    kwargs = {"policy": policy} | ({"fpr": fpr} if fpr else {})
    enc = BloomIndexCodec(**kwargs).encode(truth, ctx)
    decoded = BloomIndexCodec.decode(enc.data, enc.params, enc.indices.numel(), ctx)
    assert torch.equal(decoded, enc.indices)
    assert enc.indices.numel() == r or (policy == "p0" and enc.indices.numel() > r)
    if r:
        assert bool((enc.indices[1:] > enc.indices[:-1]).all()) and 0 <= int(enc.indices[0]) and int(enc.indices[-1]) < d


def test_spec_strings_and_empty_selection():
    c = dr.Compressor.from_spec("topk:0.01/bloom:fpr=1e-3,policy=p2/raw")
    assert c.index_codec.config == {"fpr": 1e-3, "policy": "p2"}
    assert dr.Compressor.from_spec(c.spec).spec == c.spec
    with pytest.raises(dr.ConfigError):
        dr.Compressor(0.01, "topk", "bloom", "raw", policy="p3")
    with pytest.raises(dr.ConfigError):
        dr.Compressor(0.01, "topk", "bloom", "raw", fpr=1.5)
    empty = dr.Compressor(0.0, "topk", "bloom", "raw").compress_detailed(torch.randn(100))
    assert dr.decode(empty.payload).k == 0


# --- validation ---------------------------------------------------------------------------


def _valid(policy: str = "p0", d: int = 20_000, r: int = 200):
    ctx = _ctx(d)
    enc = BloomIndexCodec(policy=policy).encode(_random_indices(d, r, 9), ctx)
    return enc, ctx


@pytest.mark.parametrize("policy", POLICIES)
def test_inconsistent_params_are_decode_errors(policy):
    enc, ctx = _valid(policy)
    r, nbits, nhashes, code = struct.unpack("<QQBB", enc.params)
    k = enc.indices.numel()
    bad = [
        (struct.pack("<QQBB", r, nbits + 1, nhashes, code), k),  # m does not match r, h, d
        (struct.pack("<QQBB", r, nbits, 0, code), k),  # no hashes
        (struct.pack("<QQBB", r, nbits, 65, code), k),
        (struct.pack("<QQBB", r + 1, nbits, nhashes, code), k),
        (struct.pack("<QQBB", 30_000, nbits, nhashes, code), k),  # r > d
        (struct.pack("<QQBB", r, nbits, nhashes, 4), k),  # unknown policy
        (struct.pack("<QQBB", 0, 0, 0, code), k),
        (enc.params + b"\0", k),
        (enc.params, k + 1),
        (enc.params, r - 1),
    ]
    for params, kk in bad:
        with pytest.raises(dr.DecodeError):
            BloomIndexCodec.decode(enc.data, params, kk, ctx)
    with pytest.raises(dr.DecodeError):  # truncated filter
        BloomIndexCodec.decode(enc.data[:-4], enc.params, k, ctx)
    with pytest.raises(dr.DecodeError):  # a tensor far larger than the filter can describe
        BloomIndexCodec.decode(enc.data, enc.params, k, _ctx(bloom.POSITIONS_PER_BIT * nbits + 1))


def test_crafted_filters_are_decode_errors():
    enc, ctx = _valid("random")
    r, nbits, nhashes, _ = struct.unpack("<QQBB", enc.params)
    all_ones = _bits.pack_bitmap(torch.arange(nbits), nbits)  # more bits than r indices can set
    for data in (all_ones, torch.zeros_like(enc.data)):
        with pytest.raises(dr.DecodeError):
            BloomIndexCodec.decode(data, enc.params, r, ctx)
    padded = enc.data.clone()
    padded[-1] |= 0x80  # a bit past m
    if nbits % 32:
        with pytest.raises(dr.DecodeError):
            BloomIndexCodec.decode(padded, enc.params, r, ctx)


def test_huge_numel_claims_fail_fast():
    payload = bytearray(dr.Compressor(0.01, "topk", "bloom", "raw").compress(torch.randn(5000)).numpy())
    for numel in (1 << 30, 1 << 36, (1 << 64) - 1):
        struct.pack_into("<Q", payload, 16, numel)
        with pytest.raises(dr.DecodeError):
            dr.decode(reseal(torch.frombuffer(payload, dtype=torch.uint8)))


def _sequential_sweep(members: list[set[int]], candidate: list[int], key: list[int]) -> list[int]:
    """The sweep as ALGORITHMS.md states it, one set at a time (reference)."""
    chosen: set[int] = set()
    active = []
    for s in sorted(range(len(members)), key=lambda i: key[i]):
        if members[s] and not (members[s] & chosen):
            chosen.add(candidate[s])
            active.append(s)
    return active


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 60), st.integers(1, 4), st.integers(0, 2**32))
def test_parallel_sweep_replays_the_sequential_one(npositives, nsets, per_member, seed):
    rng = random.Random(seed)
    members: list[set[int]] = [set() for _ in range(nsets)]
    for member in range(npositives):
        for s in rng.sample(range(nsets), min(per_member, nsets)):
            members[s].add(member)
    candidate = [rng.choice(sorted(m)) if m else 0 for m in members]
    # Smallest set first (as the codec orders them), ties in random order.
    key = [len(m) * 1000 * nsets + tie for m, tie in zip(members, rng.sample(range(1000 * nsets), nsets))]
    pairs = [(m, s) for s in range(nsets) for m in sorted(members[s])]
    got = bloom._greedy_sweep(
        torch.tensor([m for m, _ in pairs], dtype=torch.int64).reshape(-1),
        torch.tensor([s for _, s in pairs], dtype=torch.int64).reshape(-1),
        torch.tensor(candidate),
        torch.tensor(key),
        npositives,
    )
    assert got.tolist() == _sequential_sweep(members, candidate, key)


@pytest.mark.parametrize("start", [0, 5 << 20, (1 << 32) - (1 << 20), 1 << 32, (7 << 32) + (3 << 20)])
def test_chunk_hashes_match_the_per_position_hashes(start):
    key = _hashing.hash_key(5, 6)
    offsets = torch.arange(1 << 20, dtype=torch.int32)
    h1 = torch.empty_like(offsets)
    k2 = _hashing.first_hashes_into(start, offsets, key, h1, torch.empty_like(offsets))
    expected_h1, expected_h2 = _hashing.base_hashes(start + torch.arange(1 << 20), key)
    assert torch.equal(h1, expected_h1) and torch.equal(_hashing.second_hashes(h1, k2), expected_h2)

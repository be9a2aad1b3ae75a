"""The fuzz campaign's seed corpus and the bugs it found (``deepreduce bench fuzz``).

``test_corpus_replay_and_mutations`` is the short CI run: every input of
``tests/fuzz_corpus`` (genuine seeds and inputs that once failed) plus a few thousand
coverage-free mutants per target, in a child process with the campaign's per-input
memory and time bounds. The other tests pin each fixed bug in-process.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import deepreduce as dr
from deepreduce import wire
from deepreduce.apps.bench import fuzz
from deepreduce.codecs.index import bloom
from deepreduce.engine import Segment, read_message
from deepreduce.engine.agreement import check_agreement
from deepreduce.engine.framing import frame, unframe

CORPUS = Path(__file__).parent / "fuzz_corpus"
MUTATIONS = int(os.environ.get("DEEPREDUCE_FUZZ_MUTATIONS", "2000"))


@pytest.mark.slow  # starts a process (the address-space limit must not touch pytest's)
def test_corpus_replay_and_mutations():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deepreduce.apps.bench.fuzz", "--replay", "--mutations", str(MUTATIONS),
                           "--corpus", str(CORPUS)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert set(summary) == set(fuzz.TARGETS)
    for target, s in summary.items():
        assert not s["failure_kinds"], (target, s["failure_kinds"])
        corpus = sorted(p.name for p in (CORPUS / target).iterdir())
        assert sorted(s["corpus"]) == corpus and len(corpus) >= 5
        assert s["inputs"] == len(corpus) + MUTATIONS == s["accepted"] + s["rejected"]
        assert s["rejected"] > MUTATIONS // 2  # the mutants really are malformed
        assert s["max_time_ratio"] < 1
    assert not fuzz.unexpected_outcomes(summary)
    assert proc.returncode == 0
    # Every registered codec has genuine seeds, so the replay reached every decoder.
    names = " ".join(summary["decode"]["corpus"])
    for codec in dr.index_codecs():
        assert f"index-{codec}-" in names, codec
    for codec in dr.value_codecs():
        assert f"value-{codec}-" in names, codec
    assert time.perf_counter() - start < 300


def test_seed_corpus_is_small():
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total < 400_000


# --- framing: an entry size table whose int64 sum wraps around ------------------------------


@pytest.mark.parametrize("sizes, extra", [([2**63 - 1, 2**63 - 8, 16], 8), ([2**62] * 4, 0)])
def test_unframe_rejects_sizes_whose_sum_wraps(sizes, extra):
    # Before the fix the padded sizes added up (mod 2^64) to the message length, and unframe
    # returned entries of other sizes than the table said.
    table = np.array([len(sizes), *sizes], dtype="<i8").view(np.uint8)
    message = torch.from_numpy(np.concatenate([table, np.zeros(extra, dtype=np.uint8)]))
    with pytest.raises(dr.DecodeError, match="exceeds the message"):
        unframe(message, len(sizes))


def test_unframe_regression_input_is_rejected_by_the_message_target():
    data = (CORPUS / "message" / "regress-unframe-sizes-wrap-int64").read_bytes()
    with pytest.raises(dr.DecodeError):
        fuzz.run_message(data)


# --- a received message: every inconsistency is a DecodeError ------------------------------


def _message_and_segments():
    segments = [Segment("a", 0, 3000), Segment("b", 3000, 10)]
    payload = dr.Compressor.from_spec("topk:0.01/eliasfano/fp16").compress(torch.randn(3000))
    return [payload, torch.randn(10).view(torch.uint8)], segments


def test_read_message_returns_decoded_and_raw_parts():
    entries, segments = _message_and_segments()
    parts = read_message(frame(entries), segments, torch.float32, 64, source=1)
    assert isinstance(parts[0], dr.SparseGrad) and parts[0].numel == 3000 and parts[0].k == 30
    assert torch.equal(parts[1], entries[1].view(torch.float32))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: [e[0], e[1][:36]], "sent 36 raw bytes, expected 40"),
        (lambda e: [dr.Compressor(0.01).compress(torch.randn(2999)), e[1]], "sent 2999 torch.float32 elements"),
        (lambda e: [dr.Compressor(0.01).compress(torch.randn(3000, dtype=torch.float64)), e[1]], "torch.float64"),
        (lambda e: [e[0][:-1], e[1]], "payload from rank 1"),
    ],
)
def test_read_message_raises_decode_error_naming_rank_and_segment(change, match):
    entries, segments = _message_and_segments()
    with pytest.raises(dr.DecodeError, match=match):
        read_message(frame(change(entries)), segments, torch.float32, 64, source=1)


# --- the agreement check on a peer's bytes ---------------------------------------------------


@pytest.mark.parametrize("name", ["regress-not-utf8", "regress-json-array", "regress-deep-nesting", "regress-parameters-not-a-list"])
def test_unreadable_peer_description_is_a_config_error(name):
    # Before the fix: UnicodeDecodeError, AttributeError, RecursionError and TypeError.
    peer = (CORPUS / "agreement" / name).read_bytes()
    with pytest.raises(dr.ConfigError, match="rank 1|parameters"):
        check_agreement(fuzz._TwoRanks(peer), fuzz._my_description())


def test_agreeing_peer_passes():
    check_agreement(fuzz._TwoRanks((CORPUS / "agreement" / "seed-same").read_bytes()), fuzz._my_description())


# --- Bloom: work bounded by the payload, not by numel ----------------------------------------


def test_forged_bloom_filter_with_numel_sized_positives_is_rejected_fast():
    # 1.8 KB: a one-hash filter over 2^12 positions per bit with every bit of r distinct
    # indices set. p2 chose among ~23 M positives: 12 s and 2.6 GB before the limit.
    data = (CORPUS / "decode" / "regress-bloom-p2-forged-filter-positives").read_bytes()
    start = time.perf_counter()
    with pytest.raises(dr.DecodeError, match="positives"):
        fuzz.run_decode(data)
    # ~0.2 s quiet, ~2 s on a loaded machine; without the limit it ran 12 s quiet.
    assert time.perf_counter() - start < 6.0
    header = wire.read_header(data[1:])
    assert header.index_codec == "bloom" and header.numel == 4096 * 8192 and len(data) < 2000


def test_bloom_encoder_refuses_filters_whose_policy_would_choose_among_too_many_positives():
    d, r = 1 << 20, 100
    x = torch.zeros(d)
    x[torch.randperm(d, generator=torch.Generator().manual_seed(0))[:r]] = 1.0
    for policy in ("random", "p2"):
        with pytest.raises(dr.ConfigError, match="use a smaller fpr"):
            dr.Compressor(r / d, "topk", "bloom", "raw", fpr=0.5, policy=policy).compress(x)
    # p0 sends a value for every positive, so its payload pays for them: still allowed.
    payload = dr.Compressor(r / d, "topk", "bloom", "raw", fpr=0.5, policy="p0").compress(x)
    assert dr.decode(payload).k > bloom.select_limit(r)
    # Within the limit nothing changes: fpr 1e-3 keeps |P| near r.
    sent = dr.Compressor(r / d, "topk", "bloom", "raw", fpr=1e-3, policy="p2").compress(x)
    assert dr.decode(sent).k == r


def test_select_limit_allows_every_small_tensor():
    # 2^16 positives of slack: no filter over fewer positions is ever refused.
    assert bloom.select_limit(1) > 1 << 16
    assert bloom.select_limit(1000) == 256 * 1000 + (1 << 16)


# --- uniform values: a block larger than k ---------------------------------------------------


def test_uniform_encoder_with_a_huge_block_allocates_only_k_values():
    # Before the fix the encoder zero-padded to a whole block: 16 GB for block = 2^31 - 1.
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    for bits in (1, 4):
        start = time.perf_counter()
        huge = dr.Compressor.from_spec(f"topk:0.1/eliasfano/uniform:bits={bits},block={2**31 - 1}").compress(x)
        assert time.perf_counter() - start < 2.0
        exact = dr.Compressor.from_spec(f"topk:0.1/eliasfano/uniform:bits={bits},block=500").compress(x)
        assert torch.equal(dr.decode(huge).values, dr.decode(exact).values)


# --- the harness itself --------------------------------------------------------------------


def test_bounds_grow_with_the_input_and_bloom_gets_more():
    assert fuzz.memory_bound(1000) < fuzz.memory_bound(2000) < fuzz.memory_bound(2000, bloom=True)
    assert fuzz.time_bound(0) == fuzz.BASE_SECONDS
    assert math.isclose(fuzz.time_bound(100, bloom=True) - fuzz.time_bound(100), 100 * fuzz.BLOOM_SECONDS_PER_INPUT_BYTE)


def test_reseal_lets_a_mutated_payload_past_the_checksum():
    payload = dr.Compressor(0.05).compress(torch.randn(500)).numpy().tobytes()
    bad = bytearray(payload)
    bad[-1] ^= 1
    with pytest.raises(dr.DecodeError, match="crc32"):
        dr.decode(bytes(bad))
    resealed = dr.decode(fuzz.reseal(bad))  # a value changed, and the payload says so
    assert not torch.equal(resealed.values, dr.decode(payload).values)
    assert fuzz.reseal(payload) == payload
    message = frame([torch.frombuffer(bytearray(bad), dtype=torch.uint8)]).numpy().tobytes()
    fixed = fuzz.reseal_message(message)
    assert fixed[16:] == fuzz.reseal(bad) + bytes(len(fixed) - 16 - len(bad))
    assert struct.unpack_from("<q", fixed, 0) == (1,)

"""Malformed payloads: only DecodeError, fast, and no allocation beyond a bound.

10 000 mutated / truncated / re-checksummed / random payloads per registered codec run
in two child processes (index codecs, value codecs) whose address space is capped at
~1.5 GB above their start-up size, so an allocation sized from a forged header fails
the test instead of passing unnoticed. DEEPREDUCE_FUZZ sets the count per codec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # starts processes


import deepreduce as dr
from deepreduce import wire

from helpers import HEADER_FIELDS, reseal, set_header_field

ITERATIONS = int(os.environ.get("DEEPREDUCE_FUZZ", "10000"))
HERE = Path(__file__).parent
DEFAULTS = [f"index:{n}" for n in dr.index_codecs()] + [f"value:{n}" for n in dr.value_codecs()]
# Parameter settings that take other decoding paths, fuzzed with fewer payloads each.
VARIANTS = [
    entry
    for entry in ("index:bloom:policy=leftmost", "index:bloom:policy=random", "index:bloom:policy=p2",
                  "value:qsgd:bits=3,block=7", "value:dexp:segments=single", "value:polyfit:degree=2")
    if entry.split(":")[1] in (dr.index_codecs() if entry.startswith("index") else dr.value_codecs())
]


@pytest.fixture(scope="module")
def fuzz_results() -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    groups = [
        (ITERATIONS, [e for e in DEFAULTS if e.startswith("index")]),
        (ITERATIONS, [e for e in DEFAULTS if e.startswith("value")]),
        (max(1, ITERATIONS // 4), VARIANTS),
    ]
    jobs = [
        (count, subprocess.Popen([sys.executable, str(HERE / "workers" / "fuzz.py"), str(count), "2026", *entries],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        for count, entries in groups if entries
    ]
    results = {}
    for count, job in jobs:
        out, err = job.communicate(timeout=1200)
        assert job.returncode == 0, f"fuzz worker crashed (rc={job.returncode}):\n{err[-3000:]}"
        for line in out.splitlines():
            row = json.loads(line)
            results[row["codec"]] = dict(row, iterations=count)
    return results


@pytest.mark.parametrize("codec", DEFAULTS + VARIANTS)
def test_fuzzed_payloads_raise_only_decode_error(fuzz_results, codec):
    row = fuzz_results[codec]
    assert not row["failures"], "\n".join(row["failures"])
    assert row["decoded"] + row["rejected"] == row["iterations"]
    assert row["rejected"] > row["iterations"] // 2  # the mutations really are malformed
    assert row["max_s"] < 5.0, f"slowest decode took {row['max_s']:.2f} s"


@pytest.fixture
def payload() -> torch.Tensor:
    return dr.Compressor(0.05, "topk", "eliasfano", "fp16").compress(torch.randn(2000))


def test_header_claiming_2_to_the_40_elements_fails_fast(payload):
    forged = set_header_field(payload, *HEADER_FIELDS["numel"], 2**40)
    start = time.perf_counter()
    with pytest.raises(dr.DecodeError, match="numel"):
        dr.decode(forged)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("version", 9, "version"),
        ("index_codec", 200, "index_codec"),
        ("value_codec", 200, "value_codec"),
        ("dtype", 17, "dtype"),
        ("flags", 1, "flags"),
        ("k", 10**9, "k"),
        ("k", 3, "value part|fp16"),
        ("numel", 10, "k|numel|range"),
        ("index_len", 2**40, "index/value length"),
        ("value_len", 3, "lengths"),
        ("index_params_len", 500, "params length|lengths"),
        ("sparsifier", 99, "sparsifier"),
    ],
)
def test_each_header_field_is_validated_by_name(payload, field, value, message):
    with pytest.raises(dr.DecodeError, match=message):
        dr.decode(set_header_field(payload, *HEADER_FIELDS[field], value))


def test_checksum_magic_and_length_errors(payload):
    flipped = payload.clone()
    flipped[-1] ^= 0x40
    with pytest.raises(dr.DecodeError, match="crc32"):
        dr.decode(flipped)
    bad_magic = payload.clone()
    bad_magic[0] = ord("X")
    with pytest.raises(dr.DecodeError, match="magic"):
        dr.decode(reseal(bad_magic))
    with pytest.raises(dr.DecodeError, match="shorter than"):
        dr.decode(payload[:10])
    with pytest.raises(dr.DecodeError, match="lengths"):
        dr.decode(reseal(torch.cat([payload, torch.zeros(8, dtype=torch.uint8)])))
    with pytest.raises(dr.DecodeError, match="1-D uint8"):
        dr.decode(payload.float())
    with pytest.raises(dr.DecodeError, match="uint8 tensor or bytes"):
        dr.decode([1, 2, 3])


def test_decode_accepts_bytes_and_misaligned_slices(payload):
    assert torch.equal(dr.decode(payload.numpy().tobytes()).indices, dr.decode(payload).indices)
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), payload])[3:]  # storage offset 3
    assert torch.equal(dr.decode(shifted).values, dr.decode(payload).values)


def test_non_ascending_indices_are_rejected():
    # raw indices can express any order, so the generic check is what stops them.
    from helpers import pack_parts

    good, _ = pack_parts(torch.tensor([1, 5, 9]), torch.ones(3), 10)
    header = wire.read_header(good)
    swapped = good.clone()
    start = header.index_offset
    swapped[start : start + 4], swapped[start + 4 : start + 8] = good[start + 4 : start + 8].clone(), good[start : start + 4].clone()
    with pytest.raises(dr.DecodeError, match="not strictly ascending"):
        dr.decode(reseal(swapped))
    out_of_range, _ = pack_parts(torch.tensor([1, 5, 12]), torch.ones(3), 13)
    with pytest.raises(dr.DecodeError, match="out of range"):
        dr.decode(set_header_field(out_of_range, *HEADER_FIELDS["numel"], 12))

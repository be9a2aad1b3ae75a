"""Fuzz loop run in a child process with a capped address space (see test_fuzz.py).

Usage: python tests/workers/fuzz.py ITERATIONS SEED ENTRY [ENTRY ...]
ENTRY is ``index:SPEC`` or ``value:SPEC`` with a codec spec such as ``bloom:policy=p2``.
Prints one JSON line per entry: {"codec", "decoded", "rejected", "failures", "max_s"}.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import sys
import time

import torch

import deepreduce as dr
from deepreduce import wire
from deepreduce.codecs import INDEX_CODECS

from helpers import HEADER_FIELDS, reseal

BASES = [  # numel, ratio, dtype
    (1, 1.0, torch.float32),
    (40, 0.25, torch.float16),
    (3000, 0.01, torch.float32),
    (3000, 0.2, torch.bfloat16),
    (2000, 0.0, torch.float32),
    (700, 1.0, torch.float64),
]
BOUNDARY = [0, 1, 2, 7, 8, 63, 64, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**36, 2**40, 2**63 - 1, 2**64 - 1]


def base_payloads(entry: str) -> list[torch.Tensor]:
    kind, _, spec = entry.partition(":")
    parts = f"{spec}/raw" if kind == "index" else f"eliasfano/{spec}"
    # An index codec that carries only its own sparsifier's sets (strided, blocks) gets that sparsifier.
    sparsifier = INDEX_CODECS.lookup(spec.split(":")[0]).sparsifier if kind == "index" else "topk"
    payloads = []
    for i, (numel, ratio, dtype) in enumerate(BASES):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(i)).to(dtype)
        payloads.append(dr.Compressor.from_spec(f"{sparsifier}:{ratio}/{parts}", seed=i).compress(x))
    return payloads


def mutate(rng: random.Random, base: torch.Tensor) -> tuple[str, bytes]:
    data = bytearray(base.numpy().tobytes())
    n = len(data)
    op = rng.randrange(9)
    if op == 0:  # bit flips, checksum left stale
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(n)
            data[pos] ^= 1 << rng.randrange(8)
        return "flip", bytes(data)
    if op == 1:  # byte changes anywhere, re-sealed so validation goes past the checksum
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(n)] = rng.randrange(256)
        return "bytes+reseal", _reseal(data)
    if op == 2:  # truncation
        cut = rng.randrange(n)
        return "truncate", _reseal(data[:cut]) if rng.random() < 0.5 else bytes(data[:cut])
    if op == 3:  # trailing garbage
        return "extend", _reseal(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    if op == 4:  # one header field set to a boundary or random value
        field = rng.choice(sorted(HEADER_FIELDS))
        offset, fmt = HEADER_FIELDS[field]
        limit = 1 << (8 * struct.calcsize(fmt))
        value = rng.choice([v for v in BOUNDARY if v < limit] + [rng.randrange(limit)])
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
        return f"field {field}={value}", _reseal(data)
    if op == 5:  # random bytes
        return "random", bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    if op == 6:  # valid header, random body
        body = bytes(rng.randrange(256) for _ in range(n - wire.HEADER_SIZE))
        return "random body", _reseal(data[: wire.HEADER_SIZE] + body)
    if op == 7:  # another codec's id on this codec's data
        data[rng.choice([6, 7])] = rng.randrange(1, 12)
        return "codec swap", _reseal(data)
    # codec parameter bytes and the start of the data scrambled
    start = wire.HEADER_SIZE
    for _ in range(rng.randint(1, 6)):
        pos = rng.randrange(start, min(n, start + 48)) if n > start else rng.randrange(n)
        data[pos] = rng.randrange(256)
    return "params+reseal", _reseal(data)


def _reseal(data: bytearray | bytes) -> bytes:
    return reseal(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)).numpy().tobytes()


def fuzz(entry: str, iterations: int, seed: int) -> dict:
    rng = random.Random(f"{seed}-{entry}")
    bases = base_payloads(entry)
    decoded = rejected = 0
    failures: list[str] = []
    max_s = 0.0
    for i in range(iterations):
        what, payload = mutate(rng, bases[i % len(bases)])
        start = time.perf_counter()
        try:
            sg = dr.decode(payload)
            decoded += 1
            assert sg.indices.numel() == sg.values.numel() <= sg.numel
        except dr.DecodeError:
            rejected += 1
        except BaseException as exc:  # noqa: BLE001 - any other exception is the bug we look for
            if len(failures) < 5:
                failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]} payload={payload[:96].hex()}")
            else:
                failures.append("...")
        max_s = max(max_s, time.perf_counter() - start)
    return {"codec": entry, "decoded": decoded, "rejected": rejected, "failures": failures, "max_s": max_s}


def main() -> None:
    iterations, seed, *entries = sys.argv[1:]
    # Warm up (thread pools, allocator), then cap the address space: any allocation that a
    # payload could provoke beyond ~1.5 GB fails loudly instead of passing unnoticed.
    fuzz(entries[0], 20, 0)
    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
    limit = vm_kb * 1024 + (1536 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for entry in entries:
        print(json.dumps(fuzz(entry, int(iterations), int(seed))), flush=True)


if __name__ == "__main__":
    main()

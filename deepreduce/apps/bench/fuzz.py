"""Fuzzing of everything that parses bytes from another rank: ``deepreduce bench fuzz``.

Targets (one fuzz input each; the first byte of an input is a mode byte, see below):

    decode     ``dr.decode(payload)``; seeds: every registered index and value codec, with
               several settings, dtypes and sizes. Allowed error: DecodeError.
    message    one rank's framed message as the engine reads it (``engine.read_message``:
               ``unframe``, raw entries' lengths, every payload decoded and checked against
               this rank's segments), over several segment layouts. Allowed error: DecodeError.
    agreement  a peer's configuration description in the agreement check that runs over
               every transport (``engine.agreement.check_agreement``). Allowed error: ConfigError.

The transports themselves parse no bytes: torch.distributed, Horovod and mpi4py each
only slice the gathered buffer by the sizes their size all-gather returned, and the
engine reads each slice with ``read_message``. So ``message`` covers the receive path
of every backend.

Per input the harness enforces: no exception but the allowed one; the result is
well-formed (indices strictly ascending in range, one value per index, the sizes the
header or the layout says, the same result on a second decode); an address-space limit
of :func:`memory_bound` bytes above what the process held before the input (a soft
``RLIMIT_AS``, so an over-allocation fails at once instead of swapping); and at most
:func:`time_bound` seconds. A checksum stops a coverage-guided fuzzer cold, so the mode
byte's low bit asks the harness to recompute the CRC of the payload(s) before the call.

Engines: ``atheris`` (libFuzzer, coverage-guided; ``pip install atheris``) or ``mutate``
(a coverage-free mutation loop over the seeds: byte edits, header fields and size tables
set to boundary values, truncation, splicing). The seed corpus lives in
``tests/fuzz_corpus/<target>/`` (``seed-*`` from :func:`seed_inputs`, ``regress-*``:
inputs that once failed); ``tests/test_fuzz_campaign.py`` replays it in CI.

    deepreduce bench fuzz                          # the campaign: 1 M inputs, writes RESULTS.md + results/fuzz.json
    deepreduce bench fuzz --inputs 20000 --quick   # a short run, nothing written to RESULTS.md
    deepreduce bench fuzz --replay --mutations 2000  # corpus + coverage-free mutations (what CI runs)
    deepreduce bench fuzz --write-corpus           # regenerate the seed-* files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

TARGETS = ("decode", "message", "agreement")
# Share of the campaign's inputs per target: decoding has by far the most code.
SHARES = {"decode": 0.6, "message": 0.3, "agreement": 0.1}
HEADER_SIZE = 64
_CRC_OFFSET = 56
MAX_LEN = 4096  # longest input the fuzzers make (the seeds are shorter)

# --- bounds --------------------------------------------------------------------------------

BASE_BYTES = 96 << 20  # torch temporaries and the Bloom query's fixed-size chunk buffers
BYTES_PER_INPUT_BYTE = 4096
BASE_SECONDS = 2.0
SECONDS_PER_INPUT_BYTE = 50e-6
# The Bloom decoder queries all numel <= 2^15 n positions (2^12 per filter bit, see
# codecs/index/bloom.py), ~100 ns each here, and its random and p2 policies then choose
# among at most 256 r + 2^16 <= 2^11 n + 2^16 positives (r <= 8 n), ~128 bytes and up to
# ~3 us each (p2 may sweep 16 times).
BLOOM_BYTES_PER_INPUT_BYTE = (1 << 11) * 128
BLOOM_SECONDS_PER_INPUT_BYTE = (1 << 15) * 100e-9 + (1 << 11) * 3e-6
_BLOOM_ID = 5


def _names_bloom(data: bytes) -> bool:
    """Whether any payload in ``data`` may name the Bloom index codec (a byte 5 at a
    payload's index-codec offset): only those get Bloom's allowance."""
    return any(data[m.start() + 6] == _BLOOM_ID for m in re.finditer(b"DRPL", data) if m.start() + 6 < len(data))


def memory_bound(nbytes: int, bloom: bool = False) -> int:
    """Most address space one input of ``nbytes`` may add while it is parsed.

    Every decoder allocates in proportion to what the payload carries (``k <= 8 n``
    pairs: a value takes at least one bit); the Bloom decoder's positives are bounded
    per input byte too (see ``BLOOM_BYTES_PER_INPUT_BYTE``)."""
    return BASE_BYTES + (BYTES_PER_INPUT_BYTE + (BLOOM_BYTES_PER_INPUT_BYTE if bloom else 0)) * nbytes


def time_bound(nbytes: int, bloom: bool = False) -> float:
    """Most seconds one input of ``nbytes`` may take (same reasoning as :func:`memory_bound`)."""
    return BASE_SECONDS + (SECONDS_PER_INPUT_BYTE + (BLOOM_SECONDS_PER_INPUT_BYTE if bloom else 0.0)) * nbytes


# --- checksums -------------------------------------------------------------------------------


def reseal(payload: bytes | bytearray) -> bytes:
    """``payload`` with its CRC32 field recomputed (unchanged if shorter than a header)."""
    data = bytearray(payload)
    if len(data) >= HEADER_SIZE:
        crc = zlib.crc32(bytes(data[:_CRC_OFFSET]))
        crc = zlib.crc32(b"\0\0\0\0", crc)
        crc = zlib.crc32(bytes(data[_CRC_OFFSET + 4 :]), crc)
        data[_CRC_OFFSET : _CRC_OFFSET + 4] = struct.pack("<I", crc)
    return bytes(data)


def reseal_message(message: bytes) -> bytes:
    """Recompute the CRC of every entry of a framed message that starts like a payload,
    reading the size table leniently (clamped to the message), so garbage stays garbage."""
    data = bytearray(message)
    if len(data) < 8:
        return bytes(data)
    (count,) = struct.unpack_from("<q", data, 0)
    count = max(0, min(count, (len(data) - 8) // 8))
    offset = 8 * (count + 1)
    for i in range(count):
        (size,) = struct.unpack_from("<q", data, 8 * (i + 1))
        size = max(0, min(size, len(data) - offset))
        if size >= HEADER_SIZE and data[offset : offset + 4] == b"DRPL":
            data[offset : offset + size] = reseal(data[offset : offset + size])
        offset += (size + 7) & ~7
        if offset >= len(data):
            break
    return bytes(data)


# --- the targets -----------------------------------------------------------------------------


class OracleError(AssertionError):
    """A call returned, but what it returned breaks the contract."""


def _bits_of(tensor: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[tensor.element_size()]
    return tensor.contiguous().view(view)


def _check_sparse(sg: Any, nbytes: int, numel: int | None = None, dtype: torch.dtype | None = None) -> None:
    from ...sparse import SparseGrad

    if not isinstance(sg, SparseGrad):
        raise OracleError(f"decode returned {type(sg).__name__}")
    idx, val = sg.indices, sg.values
    if idx.dtype != torch.int64 or idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
        raise OracleError(f"indices {idx.dtype}{tuple(idx.shape)} and values {val.dtype}{tuple(val.shape)} do not pair up")
    if val.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise OracleError(f"values of dtype {val.dtype}")
    if idx.numel() > 8 * nbytes:
        raise OracleError(f"{idx.numel()} pairs from {nbytes} bytes")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= sg.numel or not bool((idx[1:] > idx[:-1]).all())):
        raise OracleError("indices not strictly ascending in [0, numel)")
    if numel is not None and sg.numel != numel:
        raise OracleError(f"numel {sg.numel}, segment has {numel}")
    if dtype is not None and val.dtype != dtype:
        raise OracleError(f"values {val.dtype}, segment is {dtype}")


def _same(a: Any, b: Any) -> bool:
    return torch.equal(a.indices, b.indices) and torch.equal(_bits_of(a.values), _bits_of(b.values)) and a.numel == b.numel


def run_decode(data: bytes) -> str:
    """Target ``decode``: mode byte (bit 0: reseal the CRC), then the payload."""
    import deepreduce as dr

    if not data:
        return "empty"
    payload = reseal(data[1:]) if data[0] & 1 else data[1:]
    sg = dr.decode(payload)
    _check_sparse(sg, len(payload))
    if not _same(sg, dr.decode(payload)):  # every rank must decode a payload alike
        raise OracleError("two decodes of one payload differ")
    return "accepted"


@dataclass(frozen=True)
class Layout:
    """One bucket as the receiving rank sees it: segments, dtype, min_numel, and the
    compressor its peers use (for the seeds)."""

    sizes: tuple[int, ...]
    dtype: torch.dtype
    min_numel: int
    spec: str

    def segments(self) -> list:
        from ...engine import Segment

        out, offset = [], 0
        for i, n in enumerate(self.sizes):
            out.append(Segment(f"p{i}", offset, n))
            offset += n
        return out


LAYOUTS = (
    Layout((3000, 10), torch.float32, 64, "topk:0.01/eliasfano/fp16"),
    Layout((40, 2000, 500), torch.float16, 100, "topk:0.05/rle/qsgd"),
    Layout((5000,), torch.bfloat16, 64, "topk:0.01/bloom:policy=p2/uniform:bits=1"),
    Layout((700, 3, 1200), torch.float64, 16, "topk:0.02/zstd/zstd"),
    Layout((1500, 1500), torch.float32, 1024, "cyclic:0.01/strided/polyfit"),
    Layout((2500, 5), torch.float32, 8, "randomk:0.02/raw/dexp"),
)


def run_message(data: bytes) -> str:
    """Target ``message``: mode byte (bits 1-7: layout, bit 0: reseal payload CRCs), then
    one rank's message for that layout."""
    from ...engine import read_message
    from ...engine.framing import unframe
    from ...sparse import SparseGrad

    if not data:
        return "empty"
    layout = LAYOUTS[(data[0] >> 1) % len(LAYOUTS)]
    raw = reseal_message(data[1:]) if data[0] & 1 else data[1:]
    message = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    segments = layout.segments()
    entries = unframe(message, len(segments))
    # The framing itself: each entry is where the size table says, inside the message.
    sizes = torch.tensor(list(struct.unpack_from(f"<{len(segments)}q", raw, 8)), dtype=torch.int64)
    offset = 8 * (len(segments) + 1)
    for entry, size in zip(entries, sizes.tolist()):
        at = entry.storage_offset() - message.storage_offset()
        if entry.numel() != size or (size and at != offset) or offset + size > len(raw):
            raise OracleError(f"unframe: entry of {entry.numel()} bytes at {at}, table says {size} at {offset}")
        offset += (size + 7) & ~7
    if offset != len(raw):
        raise OracleError(f"unframe: entries end at {offset}, the message has {len(raw)} bytes")
    parts = read_message(message, segments, layout.dtype, layout.min_numel, source=1)
    if len(parts) != len(segments):
        raise OracleError(f"{len(parts)} parts for {len(segments)} segments")
    for seg, part in zip(segments, parts):
        if seg.numel < layout.min_numel:
            if isinstance(part, SparseGrad) or part.dtype != layout.dtype or part.numel() != seg.numel:
                raise OracleError(f"raw segment {seg.name}: got {type(part).__name__} of {getattr(part, 'shape', None)}")
        else:
            _check_sparse(part, len(raw), seg.numel, layout.dtype)
    return "accepted"


_AGREEMENT_MINE = None


def _my_description() -> dict:
    global _AGREEMENT_MINE
    if _AGREEMENT_MINE is None:
        from ...engine import Engine

        class _Idle:  # describe() touches no transport
            pass

        engine = Engine(lambda: _Idle(), _compressor(LAYOUTS[0].spec), start_iter=2, min_numel=64,
                        describe_extra={"parameters": [["w", [30, 100], "torch.float32"], ["b", [10], "torch.float32"]]})
        _AGREEMENT_MINE = engine.describe()
    return _AGREEMENT_MINE


class _TwoRanks:
    """A transport stand-in whose peer (rank 1) sent ``peer`` bytes."""

    def __init__(self, peer: bytes) -> None:
        self.peer = peer

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [data, self.peer]


def run_agreement(data: bytes) -> str:
    """Target ``agreement``: the bytes rank 1 sent in the configuration check."""
    from ...engine.agreement import check_agreement

    check_agreement(_TwoRanks(data), _my_description())  # type: ignore[arg-type]
    return "accepted"


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], str]
    allowed: type[BaseException]


def targets() -> dict[str, Target]:
    from ...errors import ConfigError, DecodeError

    return {
        "decode": Target(run_decode, DecodeError),
        "message": Target(run_message, DecodeError),
        "agreement": Target(run_agreement, ConfigError),
    }


# --- seeds -----------------------------------------------------------------------------------


_SIZES = [  # numel, ratio, dtype
    (1, 1.0, torch.float32),
    (40, 0.25, torch.float16),
    (3000, 0.01, torch.float32),
    (3000, 0.2, torch.bfloat16),
    (2000, 0.0, torch.float32),
    (300, 1.0, torch.float64),
    (50000, 0.002, torch.float32),
]
# Settings that take other decoding paths (entries naming an unregistered codec are skipped).
_INDEX_VARIANTS = ["bloom:policy=leftmost", "bloom:policy=random", "bloom:policy=p2", "bloom:fpr=0.3,policy=p2", "zstd:level=19"]
_VALUE_VARIANTS = ["qsgd:bits=3,block=7", "qsgd:bits=32", "uniform:bits=1", "uniform:bits=8,block=5", "dexp:segments=single",
                   "polyfit:degree=0", "polyfit:degree=10"]


def _compressor(spec: str, seed: int = 0):
    from ... import Compressor

    return Compressor.from_spec(spec, seed=seed)


def _registered(spec: str, kind: str) -> bool:
    from ... import index_codecs, value_codecs

    return spec.split(":")[0] in (index_codecs() if kind == "index" else value_codecs())


def _gradient(numel: int, dtype: torch.dtype, seed: int, special: str = "") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.exp(2 * torch.randn(numel, generator=g))  # heavy-tailed, like gradients
    if special == "nonfinite" and numel > 3:
        x[1], x[numel // 2] = float("inf"), float("nan")
    if special == "clustered":
        x[numel // 3 : numel // 3 + numel // 50] *= 100
    if special == "zeros" and numel > 3:
        x[::2] = 0
    return x.to(dtype)


def seed_inputs() -> dict[str, dict[str, bytes]]:
    """Genuine inputs per target (name -> bytes, mode byte included), deterministic."""
    from ... import index_codecs, value_codecs
    from ...codecs import INDEX_CODECS
    from ...engine.framing import frame

    out: dict[str, dict[str, bytes]] = {t: {} for t in TARGETS}

    def add_payload(name: str, spec: str, numel: int, ratio: float, dtype: torch.dtype, seed: int, special: str = "") -> None:
        sparsifier, _, rest = spec.partition("/")
        method, _, options = sparsifier.partition(":")
        spec = f"{method}:{ratio}{',' + options if options else ''}/{rest}"
        payload = _compressor(spec, seed).compress(_gradient(numel, dtype, seed, special))
        out["decode"][name] = b"\x01" + payload.numpy().tobytes()

    index_specs = [n for n in index_codecs()] + [v for v in _INDEX_VARIANTS if _registered(v, "index")]
    value_specs = [n for n in value_codecs()] + [v for v in _VALUE_VARIANTS if _registered(v, "value")]
    for spec in index_specs:
        codec = INDEX_CODECS.lookup(spec.split(":")[0])
        general = codec.general
        for i, (numel, ratio, dtype) in enumerate(_SIZES):
            add_payload(f"index-{spec}-{numel}-{ratio}-{str(dtype)[6:]}", f"{codec.sparsifier}/{spec}/raw", numel, ratio, dtype, i)
        if general:
            add_payload(f"index-{spec}-clustered", f"topk/{spec}/raw", 4000, 0.05, torch.float32, 11, "clustered")
    for spec in value_specs:
        for i, (numel, ratio, dtype) in enumerate(_SIZES):
            add_payload(f"value-{spec}-{numel}-{ratio}-{str(dtype)[6:]}", f"topk/eliasfano/{spec}", numel, ratio, dtype, i)
        add_payload(f"value-{spec}-nonfinite", f"topk/eliasfano/{spec}", 500, 0.1, torch.float32, 12, "nonfinite")
        add_payload(f"value-{spec}-zeros", f"randomk/eliasfano/{spec}", 500, 0.2, torch.float32, 13, "zeros")
    for spec in ("dgc/bloom:policy=p2/qsgd", "mstopk/zstd/polyfit", "threshold:t=1.5/rle/bf16", "cyclic/strided/uniform"):
        for i, (numel, ratio, dtype) in enumerate(_SIZES[2:4]):
            if all(_registered(part.split(":")[0], kind) for part, kind in zip(spec.split("/")[1:], ("index", "value"))):
                add_payload(f"combo-{spec.replace('/', '_')}-{i}", spec, numel, ratio, dtype, 20 + i)

    # Tensors sharing a payload, each on its own budget: uniform and fp16 values carry their runs.
    for n, value in enumerate(("uniform:bits=1,block=16", "uniform:bits=3,block=16", "fp16")):
        packed = _compressor(f"topk:0.1/eliasfano/{value}", 30 + n)
        gradient = _gradient(700, torch.float32, 30 + n, "")
        name = value.split(",")[0].replace(":bits=", "-") + ("bit" if "bits" in value else "")
        out["decode"][f"packed-{name}"] = b"\x01" + packed.compress_detailed(
            gradient, step=0, parts=[250, 170, 280]).payload.numpy().tobytes()

    # Tensors of 2^31+ elements take the int64 index paths (and fields wider than 32 bits);
    # their payloads are small, but no dense tensor that size is made: the parts are encoded directly.
    from ... import wire
    from ...codecs import CodecContext, make_index_codec, make_value_codec

    for spec in ("raw", "rle", "eliasfano", "zstd"):
        if not _registered(spec, "index"):
            continue
        numel = (1 << 33) + 5
        g = torch.Generator().manual_seed(7)
        spread = torch.unique(torch.cat([torch.randint(0, numel, (40,), generator=g), torch.arange(numel - 3, numel)]))
        sparse = torch.tensor([5, (1 << 32) + 7, (1 << 33) + 1])  # gaps above 2^32: fields wider than 32 bits
        for what, indices in (("wide", spread), ("sparse", sparse)):
            values = torch.randn(indices.numel(), generator=g)
            ctx = CodecContext(numel, torch.float32, torch.device("cpu"), 99)
            icodec, vcodec = make_index_codec(spec), make_value_codec("raw")
            ipart, vpart = icodec.encode(indices, ctx), vcodec.encode(values, ctx)
            payload = wire.pack(dtype=torch.float32, numel=numel, k=indices.numel(), index_codec_id=icodec.codec_id,
                                value_codec_id=vcodec.codec_id, index=ipart, value=vpart, rng_seed=99)
            out["decode"][f"index-{spec}-2^33-{what}"] = b"\x01" + payload.numpy().tobytes()

    for n, layout in enumerate(LAYOUTS):
        if not all(_registered(p.split(":")[0], kind) for p, kind in zip(layout.spec.split("/")[1:], ("index", "value"))):
            continue
        compressor = _compressor(layout.spec, seed=n)
        for step in range(2):
            entries = []
            for seg in layout.segments():
                x = _gradient(seg.numel, layout.dtype, 100 * n + 10 * step + seg.offset % 7)
                if seg.numel < layout.min_numel:
                    entries.append(x.contiguous().view(torch.uint8))
                else:
                    entries.append(compressor.compress(x, step=step, key=seg.name))
            out["message"][f"layout{n}-step{step}"] = bytes([(n << 1) | 1]) + frame(entries).numpy().tobytes()

    mine = _my_description()
    peers = {
        "same": dict(mine),
        "other-compressor": dict(mine, compressor="topk:0.02/rle/raw", fingerprint="0123456789abcdef"),
        "other-parameters": dict(mine, parameters=[["w", [30, 100], "torch.float16"]]),
        "extra-key": dict(mine, overlap=True),
        "missing-key": {k: v for k, v in mine.items() if k != "seed"},
    }
    for name, view in peers.items():
        out["agreement"][name] = json.dumps(view, sort_keys=True, default=str).encode()
    return out


# --- running one input under the bounds ------------------------------------------------------


@dataclass
class Failure:
    kind: str  # exception | oracle | memory | time
    signature: str
    message: str


def _signature(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "deepreduce" in f.filename and "apps/bench/fuzz" not in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__}@{where}"


class Harness:
    """Runs one target's inputs one at a time under the memory and time bounds."""

    def __init__(self, target: str, warmup: list[bytes], crash_dir: Path | None = None, cap_bytes: int = 3 << 30) -> None:
        self.name = target
        self.target = targets()[target]
        self.crash_dir = crash_dir
        self.counts = {"inputs": 0, "accepted": 0, "rejected": 0, "failures": 0}
        self.failures: dict[str, dict] = {}
        self.max_seconds = 0.0
        self.max_seconds_len = 0
        self.max_time_ratio = 0.0
        self.largest = 0
        torch.set_num_threads(1)  # one thread: the address-space accounting stays exact (no per-thread arenas)
        for data in warmup:  # warm up the allocator, thread pools and lazy imports before measuring
            self._call(data)
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")
        # Hard cap on the whole process; the per-input limit is a soft limit under it.
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        self._hard = self._vm() + cap_bytes if hard == resource.RLIM_INFINITY else min(hard, self._vm() + cap_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (self._hard, self._hard))

    def _vm(self) -> int:
        return int(os.pread(self._statm, 64, 0).split()[0]) * self._page

    def _call(self, data: bytes) -> str:
        try:
            return self.target.run(data)
        except self.target.allowed:
            return "rejected"

    def run(self, data: bytes) -> str:
        """Classify one input: accepted, rejected, or a failure (recorded and saved)."""
        n = len(data)
        bloom = _names_bloom(data)
        limit = min(self._vm() + memory_bound(n, bloom), self._hard)
        self.counts["inputs"] += 1
        self.largest = max(self.largest, n)
        resource.setrlimit(resource.RLIMIT_AS, (limit, self._hard))
        start = time.perf_counter()
        failure = None
        try:
            outcome = self._call(data)
        except OracleError as exc:
            failure = Failure("oracle", _signature(exc), str(exc)[:300])
        except BaseException as exc:  # noqa: BLE001 - any other exception is what we look for
            if isinstance(exc, KeyboardInterrupt):
                raise
            text = str(exc)
            kind = "memory" if isinstance(exc, MemoryError) or "allocate" in text else "exception"
            failure = Failure(kind, _signature(exc), f"{type(exc).__name__}: {text[:300]}")
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (self._hard, self._hard))
        seconds = time.perf_counter() - start
        if seconds > self.max_seconds:
            self.max_seconds, self.max_seconds_len = seconds, n
        self.max_time_ratio = max(self.max_time_ratio, seconds / time_bound(n, bloom))
        if failure is None and seconds > time_bound(n, bloom):
            failure = Failure("time", "time", f"{seconds:.2f} s for {n} bytes (bound {time_bound(n, bloom):.2f} s)")
        if failure is None:
            self.counts[outcome if outcome in ("accepted", "rejected") else "accepted"] += 1
            return outcome
        self.counts["failures"] += 1
        self._record(failure, data)
        return failure.kind

    def _record(self, failure: Failure, data: bytes) -> None:
        key = f"{failure.kind}:{failure.signature}"
        entry = self.failures.setdefault(key, {"kind": failure.kind, "signature": failure.signature, "message": failure.message,
                                               "count": 0, "input": None})
        entry["count"] += 1
        if self.crash_dir is not None and entry["input"] is None:
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            path = self.crash_dir / f"{self.name}-{failure.kind}-{hashlib.sha1(data).hexdigest()[:12]}"
            path.write_bytes(data)
            entry["input"] = str(path)

    def summary(self) -> dict:
        return {
            "target": self.name, **self.counts, "failure_kinds": list(self.failures.values()),
            "max_input_s": round(self.max_seconds, 4), "max_input_s_len": self.max_seconds_len,
            "max_time_ratio": round(self.max_time_ratio, 4), "largest_input": self.largest,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


# --- the coverage-free mutation engine ---------------------------------------------------------

_BOUNDARY = [0, 1, 2, 7, 8, 31, 32, 33, 63, 64, 255, 256, 4096, 65535, 2**31 - 1, 2**31, 2**32, 2**36, 2**40, 2**62,
             2**63 - 1, 2**63, 2**64 - 1]
_HEADER_FIELDS = [(4, "B"), (5, "B"), (6, "B"), (7, "B"), (8, "B"), (9, "B"), (10, "H"), (12, "H"), (16, "Q"), (24, "Q"),
                  (32, "Q"), (40, "Q"), (48, "Q")]


def _put(data: bytearray, offset: int, fmt: str, rng: random.Random) -> None:
    size = struct.calcsize("<" + fmt)
    if offset + size > len(data):
        return
    limit = 1 << (8 * size)
    value = rng.choice([v for v in _BOUNDARY if v < limit] + [rng.randrange(limit)])
    if rng.random() < 0.3:  # near the current value: off-by-one and small changes
        (current,) = struct.unpack_from("<" + fmt, data, offset)
        value = (current + rng.choice([-8, -1, 1, 8, rng.randrange(-1000, 1000)])) % limit
    struct.pack_into("<" + fmt, data, offset, value)


def mutate(rng: random.Random, data: bytes, pool: list[bytes], max_len: int = MAX_LEN) -> bytes:
    """One mutant of ``data`` (mode byte kept): a few stacked edits."""
    head, body = data[:1] or b"\x01", bytearray(data[1:])
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
        n = len(body)
        op = rng.randrange(10)
        if op == 0 and n:  # bit flips
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(n)
                body[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # random bytes
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:  # a payload header field (at any payload start in the input)
            starts = [m.start() for m in re.finditer(b"DRPL", body)] or [0]
            offset, fmt = rng.choice(_HEADER_FIELDS)
            _put(body, rng.choice(starts) + offset, fmt, rng)
        elif op == 3:  # an 8-byte word anywhere aligned (message size tables, counts, part headers)
            if n >= 8:
                _put(body, 8 * rng.randrange(n // 8), "Q", rng)
        elif op == 4 and n:  # truncation
            del body[rng.randrange(n) :]
        elif op == 5:  # insertion
            pos = rng.randrange(n + 1)
            body[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 6 and n:  # deletion
            pos = rng.randrange(n)
            del body[pos : pos + rng.randint(1, 16)]
        elif op == 7 and pool:  # splice with another seed
            other = rng.choice(pool)[1:]
            cut = rng.randrange(len(other) + 1)
            body = body[: rng.randrange(n + 1)] + bytearray(other[cut:])
        elif op == 8 and n:  # a codec parameter or the start of a part scrambled
            start = min(n - 1, HEADER_SIZE + rng.randrange(64))
            body[start] = rng.randrange(256)
        elif op == 9:  # a 2- or 4-byte field anywhere
            if n >= 4:
                _put(body, rng.randrange(n - 3), rng.choice("HI"), rng)
    if rng.random() < 0.1:
        head = bytes([rng.randrange(256)])
    return bytes(head + body[: max_len - 1])


def mutation_loop(harness: Harness, seeds: list[bytes], inputs: int, seed: int, deadline: float | None = None,
                  replay: bool = True) -> None:
    """Replay ``seeds`` (unless ``replay`` is false), then ``inputs`` mutants of them (coverage-free)."""
    rng = random.Random(seed)
    for data in seeds if replay else ():
        harness.run(data)
    for _ in range(inputs):
        harness.run(mutate(rng, rng.choice(seeds), seeds))
        if deadline is not None and time.monotonic() > deadline:
            break


# --- corpus on disk --------------------------------------------------------------------------


def default_corpus_dir() -> Path:
    """``tests/fuzz_corpus`` of the source checkout (or of the working directory)."""
    checkout = Path(__file__).resolve().parents[3] / "tests" / "fuzz_corpus"
    return checkout if checkout.parent.is_dir() else Path.cwd() / "tests" / "fuzz_corpus"


def write_corpus(corpus: Path) -> dict[str, int]:
    """Rewrite the ``seed-*`` files of every target (``regress-*`` files are kept)."""
    counts = {}
    for target, inputs in seed_inputs().items():
        folder = corpus / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for name, data in inputs.items():
            safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)
            (folder / f"seed-{safe}").write_bytes(data)
        counts[target] = len(inputs)
    return counts


def keep_found(corpus: Path, work: Path, targets_: list[str]) -> dict[str, int]:
    """Copy a campaign's working corpus (inputs libFuzzer kept for new coverage) into the
    seed corpus as ``cov-<sha1>``, replacing the ``cov-*`` files of an earlier campaign."""
    counts = {}
    for target in targets_:
        found = sorted(p for p in (work / target).iterdir() if p.is_file()) if (work / target).is_dir() else []
        if not found:
            continue
        for old in (corpus / target).glob("cov-*"):
            old.unlink()
        for path in found:
            data = path.read_bytes()
            (corpus / target / f"cov-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
        counts[target] = len(found)
    return counts


# Functions on the receive path: everything a fuzz input can reach (not the encoders).
_RECEIVE_PATH = {
    "decode", "read_header", "as_payload", "_check_indices", "unframe", "read_message", "_decode", "check_agreement", "_read_view",
    "_parameter_mismatch", "unpack_fixed", "bitmap_positions", "bitmap_to_bool", "zstd_decompress", "unpack_params",
    "expect_nbytes", "from_bytes", "from_byte_planes", "unpack_permutation", "segment_grid", "evaluate", "check_coefficients",
    "coefficient_count", "query", "_select", "_conflict_sets", "_greedy_sweep", "_pairs", "_random", "_leftmost", "_all",
    "positive_limit", "select_limit", "indices_from_gaps", "_per_value", "_block_of",
}


def receive_path_coverage(folders: list[Path]) -> dict | None:
    """Statement coverage of the receive-path functions when every input in ``folders``
    (``<folder>/<target>/*``) is replayed once; None without the ``coverage`` package."""
    try:
        import coverage
    except ImportError:
        return None
    import ast

    package = Path(__file__).resolve().parents[2]
    cov = coverage.Coverage(data_file=None, include=[str(package / "*")], omit=[str(package / "apps" / "*")])
    runners = targets()
    cov.start()
    try:
        for target, runner in runners.items():
            for folder in folders:
                for path in sorted((folder / target).glob("*")) if (folder / target).is_dir() else []:
                    try:
                        runner.run(path.read_bytes())
                    except BaseException:  # noqa: BLE001 - only which lines ran matters here
                        pass
    finally:
        cov.stop()
    total = missed = 0
    misses = []
    for fname in cov.get_data().measured_files():
        _, statements, _, missing, _ = cov.analysis2(fname)
        for node in ast.walk(ast.parse(Path(fname).read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in _RECEIVE_PATH:
                body = range(node.body[0].lineno, node.end_lineno + 1)
                lines = [n for n in statements if n in body]
                lost = [n for n in missing if n in body]
                total, missed = total + len(lines), missed + len(lost)
                if lost:
                    misses.append(f"{Path(fname).relative_to(package)}:{node.name} {lost}")
    return {"statements": total, "covered": total - missed, "percent": round(100 * (total - missed) / max(total, 1), 1),
            "missed": misses}


def read_corpus(corpus: Path, target: str) -> dict[str, bytes]:
    folder = corpus / target
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def _corpus_or_seeds(corpus: Path, target: str) -> list[bytes]:
    return list(read_corpus(corpus, target).values()) or list(seed_inputs()[target].values())


# --- workers -----------------------------------------------------------------------------------

# Started with `python -c`: atheris must instrument deepreduce's modules as they are first
# imported, before anything else imports them (the codecs are imported by discovery).
_ATHERIS_BOOT = """
import sys, atheris
with atheris.instrument_imports(include=["deepreduce"], exclude=["deepreduce.apps"]):
    import deepreduce, deepreduce.engine, deepreduce.engine.agreement, deepreduce.codecs
    deepreduce.index_codecs(); deepreduce.value_codecs()
from deepreduce.apps.bench import fuzz
fuzz.atheris_worker(sys.argv[1:])
"""


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def atheris_worker(argv: list[str]) -> None:
    """One libFuzzer run over one target (inside the booted, instrumented process)."""
    import atheris

    target, runs, stats_path, crash_dir, libfuzzer_args = argv[0], int(argv[1]), Path(argv[2]), Path(argv[3]), argv[5:]
    harness = Harness(target, _corpus_or_seeds(Path(argv[4]), target), crash_dir)
    last = [time.monotonic()]

    def one_input(data: bytes) -> None:
        harness.run(data)
        done = harness.counts["inputs"]
        # libFuzzer ends the process with exit(): flush the counters as we go, and exactly at the end.
        if done == runs or done % 1000 == 0 or time.monotonic() - last[0] > 2:
            last[0] = time.monotonic()
            _write_json_atomic(stats_path, harness.summary())

    atheris.Setup([sys.argv[0], f"-runs={runs}", *libfuzzer_args], one_input)
    atheris.Fuzz()


def mutate_worker(argv: list[str]) -> None:
    target, runs, stats_path, crash_dir, corpus, seed = argv[0], int(argv[1]), Path(argv[2]), Path(argv[3]), Path(argv[4]), int(argv[5])
    seeds = _corpus_or_seeds(corpus, target)
    harness = Harness(target, seeds, crash_dir)
    mutation_loop(harness, seeds, max(0, runs - len(seeds)), seed)
    _write_json_atomic(stats_path, harness.summary())


@dataclass
class Shard:
    target: str
    runs: int
    seed: int
    stats: Path
    log: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    result: dict = field(default_factory=dict)


_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_COV = re.compile(r"cov: (\d+) ft: (\d+)")


def _start(shard: Shard, engine: str, corpus: Path, work: Path, crash_dir: Path, max_seconds: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if engine == "atheris":
        (work / shard.target).mkdir(parents=True, exist_ok=True)
        seeds = corpus / shard.target
        flags = [f"-seed={shard.seed}", f"-max_len={MAX_LEN}", "-timeout=60", "-rss_limit_mb=6144", "-print_final_stats=1",
                 f"-max_total_time={max_seconds}", "-reload=1", "-len_control=200", f"-artifact_prefix={work}/",
                 str(work / shard.target)]
        flags += [str(seeds)] if seeds.is_dir() else []  # new units go to the first folder, the working corpus
        cmd = [sys.executable, "-c", _ATHERIS_BOOT, shard.target, str(shard.runs), str(shard.stats), str(crash_dir), str(corpus), *flags]
    else:
        cmd = [sys.executable, "-m", "deepreduce.apps.bench.fuzz", "--mutate-worker", shard.target, str(shard.runs),
               str(shard.stats), str(crash_dir), str(corpus), str(shard.seed)]
    shard.started = time.monotonic()
    shard.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=shard.log.open("w"), env=env)


def _finish(shard: Shard) -> None:
    log = shard.log.read_text(errors="replace") if shard.log.exists() else ""
    stats = json.loads(shard.stats.read_text()) if shard.stats.exists() else {}
    libfuzzer = {k: int(v) for k, v in _STAT.findall(log)}
    cov = _COV.findall(log)
    shard.result = {
        "target": shard.target, "runs": shard.runs, "returncode": shard.proc.returncode if shard.proc else None,
        "wall_s": round(time.monotonic() - shard.started, 1), "stats": stats,
        "executed": libfuzzer.get("number_of_executed_units", stats.get("inputs", 0)),
        "libfuzzer": libfuzzer, "coverage": [int(c) for c in cov[-1]] if cov else None,
        "tail": log[-1500:] if (shard.proc and shard.proc.returncode) else "",
    }


def run_campaign(total: int, target_names: list[str], engine: str, jobs: int, corpus: Path, work: Path, crash_dir: Path,
                 shard_runs: int, max_seconds: int, console: Any = None) -> list[dict]:
    """Run ``total`` inputs split over the targets (``SHARES``) in shards of at most
    ``shard_runs``, ``jobs`` processes at a time; returns one result per shard."""
    weights = {t: SHARES[t] for t in target_names}
    scale = sum(weights.values())
    queue: list[Shard] = []
    seed = 1
    for t in target_names:
        remaining = int(round(total * weights[t] / scale))
        while remaining > 0:
            runs = min(shard_runs, remaining)
            queue.append(Shard(t, runs, seed, work / f"stats-{t}-{seed}.json", work / f"log-{t}-{seed}.txt"))
            remaining -= runs
            seed += 1
    # Interleave targets so parallel workers fuzz different code.
    first = {t: min(q.seed for q in queue if q.target == t) for t in {q.target for q in queue}}
    queue.sort(key=lambda s: (s.seed - first[s.target], target_names.index(s.target)))
    running: list[Shard] = []
    done: list[Shard] = []
    began = time.monotonic()
    while queue or running:
        while queue and len(running) < jobs:
            shard = queue.pop(0)
            _start(shard, engine, corpus, work, crash_dir, max_seconds)
            running.append(shard)
        time.sleep(1.0)
        for shard in list(running):
            if shard.proc.poll() is not None:
                _finish(shard)
                running.remove(shard)
                done.append(shard)
                if console is not None:
                    r = shard.result
                    console.print(f"[{time.monotonic() - began:7.0f} s] {r['target']:<9} seed {shard.seed}: {r['executed']} inputs, "
                                  f"{r['stats'].get('failures', '?')} failures, rc={r['returncode']}, {r['wall_s']} s")
    return [s.result for s in done]


def summarize(results: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in results:
        t = out.setdefault(r["target"], {"inputs": 0, "accepted": 0, "rejected": 0, "failures": 0, "crashed_workers": 0,
                                         "max_input_s": 0.0, "max_time_ratio": 0.0, "peak_rss_mb": 0.0, "wall_s": 0.0,
                                         "coverage": 0, "features": 0, "failure_kinds": {}})
        s = r["stats"]
        t["inputs"] += r["executed"]
        for key in ("accepted", "rejected", "failures"):
            t[key] += s.get(key, 0)
        t["crashed_workers"] += int(r["returncode"] not in (0, None))
        t["max_input_s"] = max(t["max_input_s"], s.get("max_input_s", 0.0))
        t["max_time_ratio"] = max(t["max_time_ratio"], s.get("max_time_ratio", 0.0))
        t["peak_rss_mb"] = max(t["peak_rss_mb"], s.get("peak_rss_mb", 0.0), r["libfuzzer"].get("peak_rss_mb", 0))
        t["wall_s"] += r["wall_s"]
        if r["coverage"]:
            t["coverage"], t["features"] = max(t["coverage"], r["coverage"][0]), max(t["features"], r["coverage"][1])
        for f in s.get("failure_kinds", []):
            entry = t["failure_kinds"].setdefault(f"{f['kind']}:{f['signature']}", dict(f, count=0))
            entry["count"] += f["count"]
    return out


# --- command line ------------------------------------------------------------------------------


def replay(corpus: Path, target_names: list[str], mutations: int, seed: int = 2026) -> dict[str, dict]:
    """Every corpus input of each target, then ``mutations`` coverage-free mutants, in this
    process (bounds applied per input). Returns each target's :meth:`Harness.summary`."""
    out = {}
    for target in target_names:
        inputs = read_corpus(corpus, target)
        pool = list(inputs.values()) or list(seed_inputs()[target].values())
        harness = Harness(target, pool[:20])
        outcomes = {name: harness.run(data) for name, data in inputs.items()}
        mutation_loop(harness, pool, mutations, seed, replay=not inputs)
        out[target] = dict(harness.summary(), corpus=outcomes)
    return out


def _expected_outcome(target: str, name: str) -> str | None:
    """Genuine seeds decode; regression inputs and disagreeing descriptions are rejected;
    ``cov-*`` inputs (kept from a campaign for the code they reach) may be either."""
    if name.startswith("cov-"):
        return None
    if name.startswith("regress-") or (target == "agreement" and name != "seed-same"):
        return "rejected"
    return "accepted"


def unexpected_outcomes(summary: dict[str, dict]) -> list[str]:
    """Corpus inputs of a :func:`replay` whose outcome is not the expected one."""
    return [f"{target}/{name}: {outcome}" for target, s in summary.items() for name, outcome in s["corpus"].items()
            if outcome not in ((_expected_outcome(target, name),) if _expected_outcome(target, name) else ("accepted", "rejected"))]


def _results_body(summary: dict[str, dict], meta: dict) -> str:
    from . import markdown_table

    rows = []
    for t, s in sorted(summary.items(), key=lambda item: TARGETS.index(item[0])):
        rows.append([t, f"{s['inputs']:,}", f"{s['accepted']:,}", f"{s['rejected']:,}", s["failures"] + s["crashed_workers"],
                     f"{s['max_input_s']:.3f}", f"{s['max_time_ratio']:.3f}", f"{s['peak_rss_mb']:.0f}", s["coverage"] or "-"])
    total = sum(s["inputs"] for s in summary.values())
    crashes = sum(s["failures"] + s["crashed_workers"] for s in summary.values())
    lines = [
        "## Fuzzing",
        "",
        f"`{meta['command']}`: {meta['engine']} ({meta['engine_version']}), {meta['jobs']} processes, "
        f"{meta['wall_s'] / 60:.1f} min wall time on {os.cpu_count()} cores; **{total:,} inputs, {crashes} crashes**. "
        "A crash is any exception other than the target's documented error (DecodeError; ConfigError for the agreement "
        "check), a malformed result, an allocation beyond the memory bound, or an input slower than the time bound.",
        "",
        markdown_table(["target", "inputs", "accepted", "rejected", "crashes", "slowest input (s)", "slowest / time bound",
                        "peak RSS (MB)", "coverage (edges)"], rows),
        "",
        f"Bounds per input of n bytes: address space {BASE_BYTES >> 20} MiB + {BYTES_PER_INPUT_BYTE // 1024} KiB n "
        f"(a soft RLIMIT_AS over what the process held before the input) and {BASE_SECONDS:g} s + "
        f"{SECONDS_PER_INPUT_BYTE * 1e6:g} us n; an input naming the Bloom index codec gets "
        f"{BLOOM_BYTES_PER_INPUT_BYTE >> 10} KiB and {BLOOM_SECONDS_PER_INPUT_BYTE * 1e3:.1f} ms more per byte "
        "(its decoder queries up to 2^15 positions per payload byte).",
    ]
    cov = meta.get("receive_path_coverage")
    if cov:
        lines += ["", f"Replaying the seeds and the inputs the fuzzer kept runs {cov['covered']} of the {cov['statements']} "
                      f"statements ({cov['percent']} %) of the receive-path functions (decoders, header, framing, message, "
                      "agreement check); `results/fuzz.json` lists the lines no input reached."]
    if meta["engine"] == "atheris":
        lines += ["", "Peak RSS is the fuzzing process's, not one input's: atheris 3.0 keeps every tensor that an "
                      "instrumented comparison returns (a 5-line script reproduces it), so a process grows by 1-10 KB per "
                      "input; the memory bound is checked against the process's size just before each input."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--mutate-worker"]:
        mutate_worker(argv[1:])
        return 0
    from . import make_console, output_dir, reproduce_command, update_results_section, write_json

    parser = argparse.ArgumentParser(prog="deepreduce bench fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs in total, split over the targets")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--engine", choices=("atheris", "mutate"), default=None, help="default: atheris if installed")
    parser.add_argument("--jobs", type=int, default=2, help="fuzzing processes at a time")
    parser.add_argument("--shard", type=int, default=100_000,
                        help="inputs per fuzzing process (atheris 3.0 keeps every tensor an instrumented comparison returns, "
                             "so a process grows by ~1-10 KB per input)")
    parser.add_argument("--max-shard-seconds", type=int, default=3600, help="time limit of one fuzzing process")
    parser.add_argument("--corpus", type=Path, default=None, help="seed corpus (default tests/fuzz_corpus of the checkout)")
    parser.add_argument("--work", type=Path, default=None, help="working corpus, logs, crashes (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="where RESULTS.md and results/ go (default benchmarks/)")
    parser.add_argument("--quick", action="store_true", help="print the summary only; write no results")
    parser.add_argument("--replay", action="store_true", help="replay the corpus plus --mutations coverage-free mutants per target, in this process")
    parser.add_argument("--mutations", type=int, default=2000)
    parser.add_argument("--write-corpus", action="store_true", help="regenerate the seed-* files of the corpus and exit")
    parser.add_argument("--keep-found", action="store_true", help="after the campaign, copy the inputs the fuzzer kept into the corpus as cov-*")
    args = parser.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    if any(t not in TARGETS for t in names):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    corpus = args.corpus or default_corpus_dir()
    console = make_console()

    if args.write_corpus:
        counts = write_corpus(corpus)
        console.print(f"wrote seed corpus to {corpus}: {counts}")
        return 0
    if args.replay:
        summary = replay(corpus, names, args.mutations)
        print(json.dumps(summary, indent=1))
        return 1 if any(s["failures"] for s in summary.values()) or unexpected_outcomes(summary) else 0

    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "mutate"
    engine_version = "coverage-free mutation loop"
    if engine == "atheris":
        import importlib.metadata

        engine_version = f"atheris {importlib.metadata.version('atheris')}, libFuzzer, coverage-guided"
    work = args.work or Path(tempfile.mkdtemp(prefix="deepreduce-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    crash_dir = work / "crashes"
    console.print(f"fuzzing {', '.join(names)}: {args.inputs:,} inputs with {engine}, {args.jobs} processes; work folder {work}")
    began = time.monotonic()
    results = run_campaign(args.inputs, names, engine, args.jobs, corpus, work, crash_dir, args.shard, args.max_shard_seconds, console)
    wall = time.monotonic() - began
    summary = summarize(results)
    for t, s in summary.items():
        console.print(f"{t:<9} {s['inputs']:>10,} inputs  {s['accepted']:>9,} accepted  {s['rejected']:>9,} rejected  "
                      f"{s['failures']} failures  {s['crashed_workers']} crashed workers  slowest {s['max_input_s']:.3f} s  "
                      f"peak RSS {s['peak_rss_mb']:.0f} MB  cov {s['coverage']}")
        for f in s["failure_kinds"].values():
            console.print(f"    {f['count']} x {f['kind']} {f['signature']}: {f['message'][:160]} ({f['input']})")
    crashes = sum(s["failures"] + s["crashed_workers"] for s in summary.values())
    coverage_report = receive_path_coverage([corpus, work])
    if coverage_report:
        console.print(f"receive-path statements reached by the seeds and the inputs found: {coverage_report['covered']}/"
                      f"{coverage_report['statements']} ({coverage_report['percent']} %)")
    if args.keep_found:
        console.print(f"kept the found inputs in {corpus}: {keep_found(corpus, work, names)}")
    if not args.quick:
        out = output_dir(args.out)
        meta = {"command": reproduce_command("fuzz", argv), "engine": engine, "engine_version": engine_version,
                "jobs": args.jobs, "wall_s": wall, "total_inputs": sum(s["inputs"] for s in summary.values()), "crashes": crashes,
                "receive_path_coverage": coverage_report}
        write_json(out / "results" / "fuzz.json", {"meta": meta, "targets": summary, "shards": results})
        update_results_section(out / "RESULTS.md", "fuzz", _results_body(summary, meta))
        console.print(f"wrote {out / 'RESULTS.md'} and {out / 'results' / 'fuzz.json'}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

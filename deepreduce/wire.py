"""The self-describing payload: one uint8 tensor = header + codec parameters + index part + value part.

Layout (little endian)::

    offset  size  field
    0       4     magic b"DRPL"
    4       1     format version (1)
    5       1     sparsifier id (0 = not recorded)
    6       1     index codec id
    7       1     value codec id
    8       1     dtype code (0 fp32, 1 fp16, 2 bf16, 3 fp64)
    9       1     flags (0)
    10      2     index codec parameter bytes
    12      2     value codec parameter bytes
    14      2     reserved (0)
    16      8     numel  (elements of the dense tensor)
    24      8     k      (index/value pairs carried)
    32      8     index part bytes
    40      8     value part bytes
    48      8     random-stream seed of this (seed, step, bucket)
    56      4     CRC32 of the whole payload with this field zeroed
    60      4     reserved (0)
    64      ...   index params, value params, zero padding to 8 bytes,
                  index part, zero padding to 8 bytes, value part

:func:`read_header` validates every field before anything that depends on it is
allocated, and raises :class:`~deepreduce.errors.DecodeError` naming the field. This
module is the byte format only: :mod:`deepreduce.compressor` encodes and decodes the
parts; codec and sparsifier ids come from :mod:`deepreduce.codecs.ids`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .codecs.ids import name_of
from .errors import DecodeError

MAGIC = b"DRPL"
VERSION = 1
HEADER = struct.Struct("<4s6B3H5Q2I")
HEADER_SIZE = HEADER.size  # 64
_CRC_OFFSET = 56
MAX_NUMEL = 1 << 36  # 68.7 G elements: far beyond any real bucket, far below what would wrap

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

assert HEADER_SIZE == 64


def pad8(n: int) -> int:
    """``n`` rounded up to a multiple of 8 bytes: every part and framed entry starts aligned."""
    return (n + 7) & ~7


@dataclass(frozen=True)
class Header:
    version: int
    sparsifier_id: int
    index_codec_id: int
    value_codec_id: int
    dtype: torch.dtype
    numel: int
    k: int
    index_params: bytes
    value_params: bytes
    index_nbytes: int
    value_nbytes: int
    rng_seed: int

    @property
    def index_codec(self) -> str:
        return name_of("index", self.index_codec_id)

    @property
    def value_codec(self) -> str:
        return name_of("value", self.value_codec_id)

    @property
    def sparsifier(self) -> str | None:
        return name_of("sparsifier", self.sparsifier_id)

    @property
    def index_offset(self) -> int:
        return HEADER_SIZE + pad8(len(self.index_params) + len(self.value_params))

    @property
    def value_offset(self) -> int:
        return self.index_offset + pad8(self.index_nbytes)

    @property
    def total_nbytes(self) -> int:
        return self.value_offset + self.value_nbytes


def _crc(host: np.ndarray) -> int:
    crc = zlib.crc32(host[:_CRC_OFFSET])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    return zlib.crc32(host[_CRC_OFFSET + 4 :], crc)


def _host_bytes(payload: torch.Tensor) -> np.ndarray:
    return payload.detach().cpu().numpy()


def pack(
    *,
    dtype: torch.dtype,
    numel: int,
    k: int,
    index_codec_id: int,
    value_codec_id: int,
    index: Any,
    value: Any,
    sparsifier_id: int = 0,
    rng_seed: int = 0,
) -> torch.Tensor:
    """Frame the encoded parts (``.data`` bytes and ``.params`` header bytes of each)
    into one payload, on the device of the index part."""
    device = index.data.device
    header = HEADER.pack(
        MAGIC, VERSION, sparsifier_id, index_codec_id, value_codec_id, DTYPE_CODES[dtype], 0,
        len(index.params), len(value.params), 0,
        numel, k, index.data.numel(), value.data.numel(), rng_seed, 0, 0,
    )
    params = index.params + value.params
    head = header + params + bytes(pad8(len(params)) - len(params))
    parts = [torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device), index.data.reshape(-1)]
    gap = pad8(index.data.numel()) - index.data.numel()
    if gap:
        parts.append(torch.zeros(gap, dtype=torch.uint8, device=device))
    parts.append(value.data.reshape(-1).to(device))
    payload = torch.cat(parts)
    crc = _crc(_host_bytes(payload))
    payload[_CRC_OFFSET : _CRC_OFFSET + 4] = torch.tensor(list(struct.pack("<I", crc)), dtype=torch.uint8, device=device)
    return payload


def as_bytes_tensor(data: Any, what: str = "payload", error: type[Exception] = DecodeError) -> torch.Tensor:
    """``data`` (a tensor, bytes or numpy array) as a 1-D uint8 tensor, or ``error`` naming ``what``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytearray(data)
        data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    elif isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, torch.Tensor):
        raise error(f"{what} must be a uint8 tensor or bytes, got {type(data).__name__}")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise error(f"{what} must be a 1-D uint8 tensor, got {data.dtype} of shape {tuple(data.shape)}")
    return data


def as_payload(payload: Any) -> torch.Tensor:
    """A payload as an 8-byte-aligned 1-D uint8 tensor; :class:`DecodeError` for anything else."""
    payload = as_bytes_tensor(payload)
    if payload.storage_offset() % 8 or not payload.is_contiguous():
        # one dense, 8-byte-aligned run of bytes: the parts are viewed as wider types and checksummed
        payload = payload.clone(memory_format=torch.contiguous_format)
    return payload


def read_header(payload: Any) -> Header:
    """Parse and validate the header (and checksum) of a payload without decoding it."""
    payload = as_payload(payload)
    n = payload.numel()
    if n < HEADER_SIZE:
        raise DecodeError(f"payload of {n} bytes is shorter than the {HEADER_SIZE}-byte header")
    host = _host_bytes(payload[:HEADER_SIZE]).tobytes()
    (magic, version, sparsifier_id, index_id, value_id, dtype_code, flags, ip_len, vp_len,
     reserved16, numel, k, index_nbytes, value_nbytes, rng_seed, crc, reserved32) = HEADER.unpack(host)
    if magic != MAGIC:
        raise DecodeError(f"header field magic: expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise DecodeError(f"header field version: unsupported format version {version} (this build reads {VERSION})")
    if flags or reserved16 or reserved32:
        raise DecodeError("header field flags/reserved: must be zero")
    if dtype_code not in CODE_DTYPES:
        raise DecodeError(f"header field dtype: unknown dtype code {dtype_code}")
    if sparsifier_id and name_of("sparsifier", sparsifier_id) is None:
        raise DecodeError(f"header field sparsifier: unknown sparsifier id {sparsifier_id}")
    for kind, codec_id in (("index", index_id), ("value", value_id)):
        if name_of(kind, codec_id) is None:
            raise DecodeError(f"header field {kind}_codec: unknown codec id {codec_id}")
    if numel > MAX_NUMEL:
        raise DecodeError(f"header field numel: {numel} exceeds the limit of {MAX_NUMEL}")
    if k > numel:
        raise DecodeError(f"header field k: {k} pairs cannot fit in numel={numel}")
    if k > 8 * n:
        raise DecodeError(f"header field k: {k} values cannot fit in a {n}-byte payload")
    if index_nbytes > n or value_nbytes > n:
        raise DecodeError(f"header field index/value length: parts ({index_nbytes}, {value_nbytes} bytes) exceed the payload ({n})")
    params_end = HEADER_SIZE + ip_len + vp_len
    if params_end > n:
        raise DecodeError(f"header field params length: {ip_len}+{vp_len} bytes of parameters exceed the payload")
    params = _host_bytes(payload[HEADER_SIZE:params_end]).tobytes()
    header = Header(
        version, sparsifier_id, index_id, value_id, CODE_DTYPES[dtype_code], numel, k,
        params[:ip_len], params[ip_len:], index_nbytes, value_nbytes, rng_seed,
    )
    if header.total_nbytes != n:
        raise DecodeError(f"header field lengths: parts add up to {header.total_nbytes} bytes, payload has {n}")
    host_all = _host_bytes(payload)
    padding = np.concatenate([host_all[params_end : header.index_offset], host_all[header.index_offset + index_nbytes : header.value_offset]])
    if padding.any():
        raise DecodeError("header field padding: alignment padding must be zero")
    actual = _crc(host_all)
    if actual != crc:
        raise DecodeError(f"header field crc32: checksum mismatch (stored {crc:#010x}, computed {actual:#010x})")
    return header

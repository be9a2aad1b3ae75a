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

:func:`decode` validates every field before it allocates anything that depends on
it, and raises :class:`~deepreduce.errors.DecodeError` naming the field.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .codecs import INDEX_CODECS, VALUE_CODECS, CodecContext, IndexEncoding, ValueEncoding
from .errors import DecodeError
from .sparse import SparseGrad, sparsifier_name

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


def _pad8(n: int) -> int:
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
        return INDEX_CODECS.from_id(self.index_codec_id).name

    @property
    def value_codec(self) -> str:
        return VALUE_CODECS.from_id(self.value_codec_id).name

    @property
    def sparsifier(self) -> str | None:
        return sparsifier_name(self.sparsifier_id)

    @property
    def index_offset(self) -> int:
        return HEADER_SIZE + _pad8(len(self.index_params) + len(self.value_params))

    @property
    def value_offset(self) -> int:
        return self.index_offset + _pad8(self.index_nbytes)

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
    index: IndexEncoding | Any,
    value: ValueEncoding | Any,
    sparsifier_id: int = 0,
    rng_seed: int = 0,
) -> torch.Tensor:
    """Frame the encoded parts into one payload (on the device of the index part)."""
    device = index.data.device
    header = HEADER.pack(
        MAGIC, VERSION, sparsifier_id, index_codec_id, value_codec_id, DTYPE_CODES[dtype], 0,
        len(index.params), len(value.params), 0,
        numel, k, index.data.numel(), value.data.numel(), rng_seed, 0, 0,
    )
    params = index.params + value.params
    head = header + params + bytes(_pad8(len(params)) - len(params))
    parts = [torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device), index.data.reshape(-1)]
    gap = _pad8(index.data.numel()) - index.data.numel()
    if gap:
        parts.append(torch.zeros(gap, dtype=torch.uint8, device=device))
    parts.append(value.data.reshape(-1).to(device))
    payload = torch.cat(parts)
    crc = _crc(_host_bytes(payload))
    payload[_CRC_OFFSET : _CRC_OFFSET + 4] = torch.tensor(list(struct.pack("<I", crc)), dtype=torch.uint8, device=device)
    return payload


def _as_payload(payload: Any) -> torch.Tensor:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytearray(payload)
        payload = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    elif isinstance(payload, np.ndarray):
        payload = torch.from_numpy(np.ascontiguousarray(payload))
    if not isinstance(payload, torch.Tensor):
        raise DecodeError(f"payload must be a uint8 tensor or bytes, got {type(payload).__name__}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise DecodeError(f"payload must be a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
    if payload.storage_offset() % 8:
        payload = payload.clone()  # keep the parts 8-byte aligned so they can be viewed as wider types
    return payload


def read_header(payload: Any) -> Header:
    """Parse and validate the header (and checksum) of a payload without decoding it."""
    payload = _as_payload(payload)
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
    if sparsifier_id and sparsifier_name(sparsifier_id) is None:
        raise DecodeError(f"header field sparsifier: unknown sparsifier id {sparsifier_id}")
    INDEX_CODECS.from_id(index_id)
    VALUE_CODECS.from_id(value_id)
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


def _check_indices(indices: torch.Tensor, k: int, numel: int, codec: str) -> None:
    if indices.dtype != torch.int64 or indices.dim() != 1 or indices.numel() != k:
        raise DecodeError(f"index part ({codec}): decoded {indices.numel()} indices, header says k={k}")
    if k == 0:
        return
    if bool(indices[0] < 0) or bool(indices[-1] >= numel):
        raise DecodeError(f"index part ({codec}): index out of range [0, {numel})")
    if k > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise DecodeError(f"index part ({codec}): indices are not strictly ascending")


def decode(payload: Any) -> SparseGrad:
    """Decode any deepreduce payload into a :class:`SparseGrad` (no compressor needed)."""
    payload = _as_payload(payload)
    header = read_header(payload)
    ctx = CodecContext(header.numel, header.dtype, payload.device, header.rng_seed)
    index_data = payload[header.index_offset : header.index_offset + header.index_nbytes]
    value_data = payload[header.value_offset : header.total_nbytes]
    # Values first: their length bounds k before any index decoder allocates for it.
    value_cls = VALUE_CODECS.from_id(header.value_codec_id)
    values = value_cls.decode(value_data, header.value_params, header.k, ctx)
    if values.numel() != header.k or values.dtype != header.dtype:
        raise DecodeError(f"value part ({value_cls.name}): decoded {values.numel()} values, header says k={header.k}")
    index_cls = INDEX_CODECS.from_id(header.index_codec_id)
    indices = index_cls.decode(index_data, header.index_params, header.k, ctx)
    _check_indices(indices, header.k, header.numel, index_cls.name)
    return SparseGrad(indices, values, header.numel)

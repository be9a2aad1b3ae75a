"""Helpers shared by the codecs: parameter blobs, length checks, byte views, zstd."""

from __future__ import annotations

import struct

import numpy as np
import torch
import zstandard

from ..errors import DecodeError


def unpack_params(fmt: str, params: bytes, codec: str) -> tuple:
    """Read a codec's parameter blob; a wrong size is a :class:`DecodeError`."""
    size = struct.calcsize(fmt)
    if len(params) != size:
        raise DecodeError(f"{codec}: parameter block has {len(params)} bytes, expected {size}")
    return struct.unpack(fmt, params)


def pack_runs(runs: tuple[int, ...] | list[int]) -> bytes:
    """The value counts of the tensors sharing a payload (``CodecContext.runs``), 4 bytes each."""
    return struct.pack(f"<{len(runs)}I", *runs)


def unpack_runs(blob: bytes, k: int, codec: str) -> tuple[int, ...]:
    """The counts :func:`pack_runs` wrote (``blob`` holds exactly them); they must add up to
    the payload's ``k``."""
    runs = struct.unpack(f"<{len(blob) // 4}I", blob)
    if sum(runs) != k:
        raise DecodeError(f"{codec}: runs of {sum(runs)} values, header says k={k}")
    return runs


def run_of_each(runs: tuple[int, ...] | list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, run)``: the counts as a tensor, and for each value the index of its run."""
    counts = torch.tensor(list(runs), device=device)
    return counts, torch.repeat_interleave(torch.arange(len(runs), device=device), counts)


def expect_nbytes(data: torch.Tensor, expected: int, codec: str, part: str = "data") -> None:
    if data.numel() != expected:
        raise DecodeError(f"{codec}: {part} has {data.numel()} bytes, expected {expected}")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Raw little-endian bytes of a contiguous tensor (a view, no copy)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret bytes as ``dtype``; copies only when the slice is misaligned."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if data.numel() % itemsize:
        raise DecodeError(f"byte length {data.numel()} is not a multiple of {itemsize}")
    if data.storage_offset() % itemsize:
        data = data.clone()
    return data.view(dtype)


def byte_planes(tensor: torch.Tensor) -> torch.Tensor:
    """Bytes of a tensor regrouped plane by plane (all byte 0s, then all byte 1s, ...).

    Grouping the high bytes of small integers or the exponents of floats together
    gives zstd long runs to work with."""
    itemsize = tensor.element_size()
    return as_bytes(tensor).reshape(-1, itemsize).t().contiguous().reshape(-1)


def from_byte_planes(data: torch.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return data.reshape(itemsize, count).t().contiguous().reshape(-1).view(dtype)


def zstd_compress(data: torch.Tensor, level: int) -> torch.Tensor:
    """zstd frame (with its content size) of the given bytes; returns bytes on data's device."""
    raw = data.cpu().numpy().tobytes()
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8).to(data.device)


def zstd_decompress(data: torch.Tensor, expected: int, codec: str) -> torch.Tensor:
    """Decompress one zstd frame that must expand to exactly ``expected`` bytes.

    The size in the frame header is checked before anything is allocated, so a
    small frame cannot claim gigabytes."""
    frame = data.cpu().numpy().tobytes()
    try:
        content_size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"{codec}: bad zstd frame header ({exc})") from None
    if content_size != expected:
        raise DecodeError(f"{codec}: zstd frame holds {content_size} bytes, expected {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompressobj()
        raw = out.decompress(frame)
        if not out.eof or out.unused_data:
            raise DecodeError(f"{codec}: zstd frame is truncated or has trailing bytes")
    except zstandard.ZstdError as exc:
        raise DecodeError(f"{codec}: corrupt zstd frame ({exc})") from None
    if len(raw) != expected:
        raise DecodeError(f"{codec}: zstd frame expanded to {len(raw)} bytes, expected {expected}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).to(data.device)

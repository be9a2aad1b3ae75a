"""``fp16`` value codec: values scaled by a power of two, then rounded to float16.

float16 tops out at 65504 and goes subnormal below 6e-5, where small gradients
lose their precision. Each payload therefore carries one exponent ``e`` (4 bytes)
chosen so the largest finite magnitude lands in [2^14, 2^15): values travel as
``fp16(v * 2^e)``. Scaling by a power of two is exact, so the only error is
float16's rounding (relative error <= 2^-11 for all but values ~2^25 below the
largest). Non-finite values stay non-finite, so overflow detection (AMP) still works.
When several tensors share a payload (``CodecContext.runs``: their value counts), each
tensor gets its own exponent, and the counts travel in the parameters (4 bytes each):
each tensor's values decode as from a payload of its own.
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

import numpy as np

import torch

from ..._bits import host_array
from ...errors import DecodeError
from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, pack_runs, run_of_each, unpack_runs

_TARGET_EXPONENT = 15  # largest scaled magnitude < 2^15, well inside float16's 65504
_MAX_SHIFT = 110  # keeps 2^e finite in float32


@register_value_codec
class Float16ValueCodec(ValueCodec):
    name = "fp16"
    description = "float16 values with a per-payload power-of-two scale (no overflow or underflow)"
    lossless = False
    codes_runs = True

    def packs(self, run_counts: Sequence[Sequence[int]]) -> bool:
        return True  # an exponent per run: each value is scaled and rounded as on its own

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        if ctx.runs is not None and len(ctx.runs) > 1:
            return self._encode_runs(values, ctx.runs)
        floats = values.float()
        array = host_array(floats)
        if array is not None:  # on the CPU the exponent is one host number: no tensor ops for it
            shift = _host_shift(array)
            scaled = (floats * 2.0 ** shift).to(torch.float16)
            return ValueEncoding(torch.cat([as_bytes(torch.tensor([shift], dtype=torch.int32)), as_bytes(scaled)]), b"")
        magnitude = floats.abs()
        finite_max = torch.where(torch.isfinite(magnitude), magnitude, 0.0).amax() if values.numel() else magnitude.new_zeros(())
        _, exponent = torch.frexp(finite_max)  # finite_max < 2^exponent
        shift = (_TARGET_EXPONENT - exponent.to(torch.int32)).clamp(-_MAX_SHIFT, _MAX_SHIFT)
        shift = torch.where(finite_max > 0, shift, torch.zeros_like(shift))
        scaled = (floats * torch.exp2(shift.float())).to(torch.float16)
        return ValueEncoding(torch.cat([as_bytes(shift.reshape(1)), as_bytes(scaled)]), b"")

    def _encode_runs(self, values: torch.Tensor, runs: Sequence[int]) -> ValueEncoding:
        """One exponent per run, computed as :meth:`encode` computes a payload's."""
        if sum(runs) != values.numel():
            raise ValueError(f"fp16: runs of {sum(runs)} values for {values.numel()} values")
        floats = values.float()
        _, run = run_of_each(runs, values.device)
        magnitude = floats.abs()
        finite = torch.where(torch.isfinite(magnitude), magnitude, 0.0)
        finite_max = torch.zeros(len(runs), device=values.device).scatter_reduce_(0, run, finite, "amax")
        _, exponent = torch.frexp(finite_max)
        shift = (_TARGET_EXPONENT - exponent.to(torch.int32)).clamp(-_MAX_SHIFT, _MAX_SHIFT)
        shift = torch.where(finite_max > 0, shift, torch.zeros_like(shift))
        scaled = (floats * torch.exp2(shift.float()).index_select(0, run)).to(torch.float16)
        params = struct.pack("<I", len(runs)) + pack_runs(runs)
        return ValueEncoding(torch.cat([as_bytes(shift), as_bytes(scaled)]), params)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        return PartSize(4 + 2 * k, 0)

    def encoded_size_runs(self, numel: int, runs: Sequence[int], dtype: torch.dtype) -> PartSize:
        if len(runs) < 2:
            return self.encoded_size(numel, sum(runs), dtype)
        return PartSize(4 * len(runs) + 2 * sum(runs), 4 + 4 * len(runs))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        runs = _read_runs(params, k) if params else None
        exponents = 1 if runs is None else len(runs)
        expect_nbytes(data, 4 * exponents + 2 * k, cls.name)
        shifts = from_bytes(data[: 4 * exponents], torch.int32).reshape(-1)
        if bool(((shifts < -_MAX_SHIFT) | (shifts > _MAX_SHIFT)).any()):
            raise DecodeError(f"fp16: scale exponent outside [-{_MAX_SHIFT}, {_MAX_SHIFT}]")
        scaled = from_bytes(data[4 * exponents:], torch.float16)
        if runs is None:
            return (scaled.float() * 2.0 ** -int(shifts[0])).to(ctx.dtype)
        _, run = run_of_each(runs, data.device)
        return (scaled.float() * torch.exp2(-shifts.float()).index_select(0, run)).to(ctx.dtype)


def _read_runs(params: bytes, k: int) -> tuple[int, ...]:
    if len(params) < 4:
        raise DecodeError(f"fp16: parameter block has {len(params)} bytes, expected 0 or a run count")
    (count,) = struct.unpack("<I", params[:4])
    if count < 2 or len(params) != 4 + 4 * count:
        raise DecodeError(f"fp16: parameter block has {len(params)} bytes for {count} runs")
    return unpack_runs(params[4:], k, "fp16")


def _host_shift(values: np.ndarray) -> int:
    """The payload's exponent from a float32 host array, as the tensor path computes it
    (2^e is exact in float32 for |e| <= 110: scaling by it gives the same products)."""
    finite = np.isfinite(values)
    finite_max = float(np.max(np.abs(values), where=finite, initial=0.0)) if values.size else 0.0
    if finite_max == 0:
        return 0
    _, exponent = math.frexp(finite_max)
    return min(max(_TARGET_EXPONENT - exponent, -_MAX_SHIFT), _MAX_SHIFT)

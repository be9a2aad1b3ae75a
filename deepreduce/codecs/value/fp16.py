"""``fp16`` value codec: values scaled by a power of two, then rounded to float16.

float16 tops out at 65504 and goes subnormal below 6e-5, where small gradients
lose their precision. Each payload therefore carries one exponent ``e`` (4 bytes)
chosen so the largest finite magnitude lands in [2^14, 2^15): values travel as
``fp16(v * 2^e)``. Scaling by a power of two is exact, so the only error is
float16's rounding (relative error <= 2^-11 for all but values ~2^25 below the
largest). Non-finite values stay non-finite, so overflow detection (AMP) still works.
The exponent is the payload's, so tensors sharing a payload would share it: the
engine keeps fp16 payloads per tensor (``ValueCodec.packs``).
"""

from __future__ import annotations

import math

import numpy as np

import torch

from ..._bits import host_array
from ...errors import DecodeError
from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, unpack_params

_TARGET_EXPONENT = 15  # largest scaled magnitude < 2^15, well inside float16's 65504
_MAX_SHIFT = 110  # keeps 2^e finite in float32


@register_value_codec
class Float16ValueCodec(ValueCodec):
    name = "fp16"
    description = "float16 values with a per-payload power-of-two scale (no overflow or underflow)"
    lossless = False

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
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

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        return PartSize(4 + 2 * k, 0)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        unpack_params("", params, cls.name)
        expect_nbytes(data, 4 + 2 * k, cls.name)
        shift = int(from_bytes(data[:4], torch.int32))
        if not -_MAX_SHIFT <= shift <= _MAX_SHIFT:
            raise DecodeError(f"fp16: scale exponent {shift} outside [-{_MAX_SHIFT}, {_MAX_SHIFT}]")
        scaled = from_bytes(data[4:], torch.float16)
        return (scaled.float() * 2.0 ** -shift).to(ctx.dtype)


def _host_shift(values: np.ndarray) -> int:
    """The payload's exponent from a float32 host array, as the tensor path computes it
    (2^e is exact in float32 for |e| <= 110: scaling by it gives the same products)."""
    finite = np.isfinite(values)
    finite_max = float(np.max(np.abs(values), where=finite, initial=0.0)) if values.size else 0.0
    if finite_max == 0:
        return 0
    _, exponent = math.frexp(finite_max)
    return min(max(_TARGET_EXPONENT - exponent, -_MAX_SHIFT), _MAX_SHIFT)

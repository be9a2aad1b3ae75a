"""``bf16`` value codec: values rounded to bfloat16 (8 exponent bits: no overflow, 2^-9 relative error)."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, unpack_params


@register_value_codec
class BFloat16ValueCodec(ValueCodec):
    name = "bf16"
    description = "bfloat16 values: 16 bits, fp32's range, relative error <= 2^-9"
    lossless = False

    def packs(self, run_counts: Sequence[Sequence[int]]) -> bool:
        return True  # each value is rounded on its own

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        return ValueEncoding(as_bytes(values.to(torch.bfloat16)), b"")

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        return PartSize(2 * k, 0)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        unpack_params("", params, cls.name)
        expect_nbytes(data, 2 * k, cls.name)
        return from_bytes(data, torch.bfloat16).to(ctx.dtype)

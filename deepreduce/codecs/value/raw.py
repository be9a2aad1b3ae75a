"""``raw`` value codec: the values in the gradient's own dtype, bit for bit."""

from __future__ import annotations

import torch

from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, unpack_params


@register_value_codec
class RawValueCodec(ValueCodec):
    name = "raw"
    description = "values in the gradient's dtype, bit-exact"

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        return ValueEncoding(as_bytes(values.to(ctx.dtype)), b"")

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        return PartSize(k * dtype.itemsize, 0)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        unpack_params("", params, cls.name)
        expect_nbytes(data, k * ctx.dtype.itemsize, cls.name)
        return from_bytes(data, ctx.dtype)

"""``zstd`` value codec: lossless zstd of the values' byte planes.

Float mantissas are close to random, so expect small savings: the sign/exponent
plane is what compresses. Runs on the CPU (the payload is copied there).
"""

from __future__ import annotations

import torch

from ...options import Option
from .. import CodecContext, ValueCodec, ValueEncoding, register_value_codec
from .._common import byte_planes, from_byte_planes, unpack_params, zstd_compress, zstd_decompress


@register_value_codec
class ZstdValueCodec(ValueCodec):
    name = "zstd"
    description = "zstd of byte-plane-split values (lossless, CPU; small gains on floats)"
    options = (Option("level", int, 3, "zstd level (1-22)", check=lambda v: 1 <= v <= 22, check_text="must be in [1, 22]"),)

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        return ValueEncoding(zstd_compress(byte_planes(values.to(ctx.dtype)), self.config["level"]), b"")

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        unpack_params("", params, cls.name)
        raw = zstd_decompress(data, k * ctx.dtype.itemsize, cls.name)
        return from_byte_planes(raw, ctx.dtype, k)

"""``zstd`` index codec: zstd of the index gaps, split into byte planes first.

Gaps of a sparse set are small integers whose high bytes are mostly zero; putting
all low bytes first, then all second bytes, ... hands zstd long runs, which it
compresses better than the plain gaps. Runs on the CPU (the payload is copied there).
"""

from __future__ import annotations

import struct

import torch

from ...errors import DecodeError
from ...options import Option
from .. import CodecContext, IndexCodec, IndexEncoding, register_index_codec
from .._common import byte_planes, from_byte_planes, unpack_params, zstd_compress, zstd_decompress
from .eliasfano import gaps_of, indices_from_gaps
from .raw import index_dtype


@register_index_codec
class ZstdIndexCodec(IndexCodec):
    name = "zstd"
    description = "zstd of byte-plane-split index gaps (lossless, CPU)"
    options = (Option("level", int, 3, "zstd level (1-22): higher is smaller and slower", check=lambda v: 1 <= v <= 22, check_text="must be in [1, 22]"),)

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        gaps = gaps_of(indices).to(index_dtype(ctx.numel))
        data = zstd_compress(byte_planes(gaps), self.config["level"])
        return IndexEncoding(data, struct.pack("<B", gaps.element_size()), indices)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        (width,) = unpack_params("<B", params, cls.name)
        dtype = index_dtype(ctx.numel)
        if width != torch.empty(0, dtype=dtype).element_size():
            raise DecodeError(f"zstd: gap width {width} does not match numel {ctx.numel}")
        raw = zstd_decompress(data, k * width, cls.name)
        gaps = from_byte_planes(raw, dtype, k).to(torch.int64)
        if k and bool((gaps < 0).any()):
            raise DecodeError("zstd: negative index gap")
        return indices_from_gaps(gaps)

"""``raw`` index codec: plain int32 indices (int64 when the tensor has 2**31 elements or more)."""

from __future__ import annotations

import struct

import torch

from .. import CodecContext, IndexCodec, IndexEncoding, PartSize, register_index_codec
from ...errors import DecodeError
from .._common import as_bytes, expect_nbytes, from_bytes, unpack_params


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


@register_index_codec
class RawIndexCodec(IndexCodec):
    name = "raw"
    description = "int32 indices (int64 for tensors of 2^31+ elements); the uncompressed reference"

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        dtype = index_dtype(ctx.numel)
        width = torch.empty(0, dtype=dtype).element_size()
        return IndexEncoding(as_bytes(indices.to(dtype)), struct.pack("<B", width), indices)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        return PartSize(k * torch.empty(0, dtype=index_dtype(numel)).element_size(), 1)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        (width,) = unpack_params("<B", params, cls.name)
        if width != torch.empty(0, dtype=index_dtype(ctx.numel)).element_size():
            raise DecodeError(f"raw: index width {width} does not match numel {ctx.numel}")
        expect_nbytes(data, k * width, cls.name)
        return from_bytes(data, index_dtype(ctx.numel)).to(torch.int64)

"""``strided`` index codec: evenly spaced indices as two numbers, offset and stride (16
bytes whatever ``k``). For the ``cyclic`` sparsifier, whose positions every rank can
replay; any other index set is refused when it is encoded."""

from __future__ import annotations

import struct

import torch

from ...errors import ConfigError, DecodeError
from .. import CodecContext, IndexCodec, IndexEncoding, PartSize, register_index_codec
from .._common import expect_nbytes, unpack_params

_PARAMS = "<QQ"  # offset, stride


@register_index_codec
class StridedIndexCodec(IndexCodec):
    name = "strided"
    description = "evenly spaced indices as offset + stride (no bits per element); pair with the cyclic sparsifier"
    general = False
    sparsifier = "cyclic"

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        k = indices.numel()
        offset = int(indices[0]) if k else 0
        stride = int(indices[1] - indices[0]) if k > 1 else 1
        if k > 2 and not bool((indices[1:] - indices[:-1] == stride).all()):
            raise ConfigError("the strided index codec carries evenly spaced indices only: use it with the cyclic sparsifier")
        return IndexEncoding(indices.new_empty(0, dtype=torch.uint8), struct.pack(_PARAMS, offset, stride), indices)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        return PartSize(0, struct.calcsize(_PARAMS))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        offset, stride = unpack_params(_PARAMS, params, cls.name)
        expect_nbytes(data, 0, cls.name)
        if stride < 1:
            raise DecodeError(f"strided: stride {stride} must be >= 1")
        if k and offset + stride * (k - 1) >= ctx.numel:
            raise DecodeError(f"strided: {k} indices from {offset} every {stride} exceed numel={ctx.numel}")
        return torch.arange(k, dtype=torch.int64, device=data.device) * stride + offset

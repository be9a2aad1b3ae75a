"""``qsgd`` value codec: QSGD stochastic quantisation (Alistarh et al., 2017).

Values are cut into blocks of ``block`` values. Each block sends its L2 norm
(fp32) and, per value, a sign and a level ``l`` in ``[0, s]``: ``|v|/norm * s`` rounded
down or up at random with the probability that makes the decoded value
``sign * norm * l / s`` unbiased. Levels and signs are packed together at
``ceil(log2(s+1)) + 1`` bits per value (8 bits at the default ``s = 127``), plus 32
bits per block. The random bits come from the payload's private stream, so a
payload decodes to the same values everywhere and two seeds give independent draws.

Tuning: the variance grows like ``min(n/s^2, sqrt(n)/s)`` for ``n = block``: more
levels (``bits``) or smaller blocks lower it, at 1 bit per value per doubling of
``s`` or 32 bits per block. Error feedback absorbs what is left.
A block whose norm is not finite (inf/NaN values) decodes to non-finite values,
so overflow checks downstream still fire.
"""

from __future__ import annotations

import struct
import warnings

import torch

from ... import _bits
from ...errors import ConfigError, DecodeError
from ...options import Option
from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, unpack_params

_PARAMS = "<II"  # levels s, block size
_SALT = 0x51534744  # "QSGD"
MAX_LEVELS = (1 << 31) - 1  # level + sign fit in 32 bits


def level_bits(levels: int) -> int:
    """Bits per value: ``ceil(log2(s+1))`` for the level, one for the sign."""
    return levels.bit_length() + 1


def _block_norms(magnitude: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 L2 norm of each block (computed in float64 so fp64 inputs keep their range)."""
    k = magnitude.numel()
    if block >= k:
        return torch.linalg.vector_norm(magnitude.to(torch.float64)).reshape(1).to(torch.float32)
    nblocks = -(-k // block)
    padded = torch.zeros(nblocks * block, dtype=torch.float64, device=magnitude.device)  # < 2k
    padded[:k] = magnitude
    return torch.linalg.vector_norm(padded.reshape(nblocks, block), dim=1).to(torch.float32)


def _per_value(norms: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """Each value's block norm as float64 (indexing, so a huge ``block`` allocates nothing)."""
    return norms.to(torch.float64)[torch.arange(k, device=norms.device) // block]


@register_value_codec
class QSGDValueCodec(ValueCodec):
    name = "qsgd"
    description = "QSGD: per-block fp32 norm + unbiased stochastic levels (8 bits/value at s=127)"
    lossless = False
    options = (
        Option("s", int, 127, "quantisation levels per sign (1 .. 2^31-1)", check=lambda v: 1 <= v <= MAX_LEVELS, check_text="must be in [1, 2^31-1]"),
        Option("bits", int, None, "bits per value including the sign (2..32); sets s = 2^(bits-1) - 1", check=lambda v: v is None or 2 <= v <= 32, check_text="must be in [2, 32]"),
        Option("block", int, 512, "values per norm (block size)", check=lambda v: 1 <= v <= (1 << 31) - 1, check_text="must be in [1, 2^31-1]"),
    )

    def __init__(self, **params):
        if "bucket" in params:  # the option's former name
            if "block" in params:
                raise ConfigError("value codec 'qsgd': give block (bucket is its former name), not both")
            warnings.warn("qsgd's 'bucket' option is now called 'block'", DeprecationWarning, stacklevel=2)
            params["block"] = params.pop("bucket")
        super().__init__(**params)
        bits = self.config["bits"]
        if bits is not None:
            levels = (1 << (bits - 1)) - 1
            if "s" in params and self.config["s"] != levels:
                raise ConfigError(f"value codec 'qsgd': bits={bits} means s={levels}, but s={self.config['s']} was given")
            self.config["s"] = levels

    @property
    def levels(self) -> int:
        return self.config["s"]

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        levels, block = self.levels, self.config["block"]
        k = values.numel()
        params = struct.pack(_PARAMS, levels, block)
        if k == 0:
            return ValueEncoding(values.new_empty(0, dtype=torch.uint8), params)
        wide = values.to(torch.float64)
        magnitude = wide.abs()
        norms = _block_norms(magnitude, block)
        per_value = _per_value(norms, block, k)
        finite = torch.isfinite(per_value) & (per_value > 0)
        # Scaled against the norm as sent (fp32), so the decoded value is unbiased exactly.
        scaled = torch.where(finite, magnitude / torch.where(finite, per_value, 1.0) * levels, 0.0).clamp_(0, levels)
        low = torch.floor(scaled)
        noise = torch.rand(k, generator=ctx.generator(_SALT), device=values.device, dtype=torch.float64)
        level = (low + (noise < scaled - low)).to(torch.int64)
        # A non-finite block sends its top level, so it decodes to inf/NaN as well.
        level = torch.where(torch.isfinite(per_value), level, levels)
        negative = torch.signbit(wide).to(torch.int64)
        packed = _bits.pack_fixed((level << 1) | negative, level_bits(levels))
        return ValueEncoding(torch.cat([as_bytes(norms), packed]), params)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        if k == 0:
            return PartSize(0, struct.calcsize(_PARAMS))
        return PartSize(4 * -(-k // self.config["block"]) + _bits.fixed_nbytes(k, level_bits(self.levels)), struct.calcsize(_PARAMS))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        levels, block = unpack_params(_PARAMS, params, cls.name)
        if not 1 <= levels <= MAX_LEVELS or block < 1:
            raise DecodeError(f"qsgd: levels s={levels} or block={block} out of range")
        width = level_bits(levels)
        nblocks = -(-k // block)
        expect_nbytes(data, 4 * nblocks + _bits.fixed_nbytes(k, width), cls.name)
        if k == 0:
            return torch.empty(0, dtype=ctx.dtype, device=data.device)
        norms = from_bytes(data[: 4 * nblocks], torch.float32)
        if bool((norms < 0).any()):
            raise DecodeError("qsgd: negative block norm")
        fields = _bits.unpack_fixed(data[4 * nblocks :], width, k)
        level = fields >> 1
        if bool((level > levels).any()):
            raise DecodeError(f"qsgd: level above s={levels}")
        sign = 1.0 - 2.0 * (fields & 1).to(torch.float64)
        per_value = _per_value(norms, block, k)
        return (sign * per_value * (level.to(torch.float64) / levels)).to(ctx.dtype)

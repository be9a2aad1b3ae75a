"""``uniform`` value codec: a sign and a magnitude on ``2^(bits-1)`` evenly spaced levels
per block of ``block`` values; deterministic.

- ``bits = 1``: the sign times the block's mean magnitude (the scale that minimises the
  L2 error of a sign code); one fp32 scale per block.
- ``bits >= 2``: each magnitude becomes the nearest of ``M = 2^(bits-1)`` levels evenly
  spaced from the block's smallest to its largest magnitude (both included); two fp32
  scales per block. Top-k values span a narrow range of magnitudes, so the levels are
  spent there, not on zero.

Unlike ``qsgd`` (unbiased, but at few bits its error can exceed the values' own norm),
the error is always smaller than the values: a sign code with the mean magnitude errs by
less than the values' norm, and with more bits the smallest magnitude is a level, so no
magnitude is rounded further than its distance from zero (nor than half a step). Error feedback needs exactly
that to stay bounded, so this is the codec for 1-4-bit values under error feedback.

Cost: ``bits`` per value plus 32 (``bits = 1``) or 64 bits per block. Non-finite values
give a non-finite scale, so the whole block decodes non-finite and overflow checks
downstream still fire.
"""

from __future__ import annotations

import struct

import torch

from ... import _bits
from ...errors import DecodeError
from ...options import Option
from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, unpack_params

_PARAMS = "<BI"  # bits, block size
MAX_BITS = 8


def _blocks(values: torch.Tensor, block: int) -> torch.Tensor:
    """``values`` (float64) zero-padded to whole blocks, shaped (blocks, block)."""
    k = values.numel()
    nblocks = -(-k // block)
    width = min(block, k)  # a block larger than k holds k values: never allocate the rest
    padded = torch.zeros(nblocks * width, dtype=torch.float64, device=values.device)
    padded[:k] = values
    return padded.reshape(nblocks, width)


def _block_of(k: int, block: int, device: torch.device) -> torch.Tensor:
    return torch.arange(k, device=device) // block


@register_value_codec
class UniformValueCodec(ValueCodec):
    name = "uniform"
    description = "deterministic sign + evenly spaced magnitude levels per block (1 bit: sign x mean |v|)"
    lossless = False
    options = (
        Option("bits", int, 2, f"bits per value (1..{MAX_BITS})", check=lambda v: 1 <= v <= MAX_BITS, check_text=f"must be in [1, {MAX_BITS}]"),
        Option("block", int, 128, "values per scale", check=lambda v: 1 <= v <= (1 << 31) - 1, check_text="must be in [1, 2^31-1]"),
    )

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        bits, block = self.config["bits"], self.config["block"]
        k = values.numel()
        params = struct.pack(_PARAMS, bits, block)
        if k == 0:
            return ValueEncoding(values.new_empty(0, dtype=torch.uint8), params)
        wide = values.to(torch.float64)
        magnitude = _blocks(wide.abs(), block)
        signs = torch.signbit(wide).to(torch.int64)
        if bits == 1:
            counts = torch.full((magnitude.shape[0],), float(block), dtype=torch.float64, device=values.device)
            counts[-1] = k - block * (magnitude.shape[0] - 1)
            scales = (magnitude.sum(dim=1) / counts).to(torch.float32)  # NaN/inf propagate
            return ValueEncoding(torch.cat([as_bytes(scales), _bits.pack_fixed(signs, 1)]), params)
        steps = (1 << (bits - 1)) - 1
        high = magnitude.amax(dim=1)
        low = magnitude.amin(dim=1)
        last = k - magnitude.shape[1] * (magnitude.shape[0] - 1)  # values in the last block
        if last < magnitude.shape[1]:  # its zero padding is no magnitude
            low[-1] = magnitude[-1, :last].amin()
        scales = torch.stack([low, high], dim=1).to(torch.float32)  # as the receiver sees them
        low64, high64 = (scales[:, 0].to(torch.float64), scales[:, 1].to(torch.float64))
        # Per block, broadcast over its row (no per-value gather of the block's scales).
        span = (high64 - low64).unsqueeze(1)
        usable = torch.isfinite(span) & (span > 0)
        unit = torch.where(usable, (magnitude - low64.unsqueeze(1)) / torch.where(usable, span, 1.0), 0.0)
        level = torch.round(unit * steps).clamp_(0, steps).to(torch.int64).reshape(-1)[:k]
        codes = (level << 1) | signs
        return ValueEncoding(torch.cat([as_bytes(scales.reshape(-1)), _bits.pack_fixed(codes, bits)]), params)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        bits, block = self.config["bits"], self.config["block"]
        scales = 0 if k == 0 else 4 * (1 if bits == 1 else 2) * -(-k // block)
        return PartSize(scales + _bits.fixed_nbytes(k, bits), struct.calcsize(_PARAMS))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        bits, block = unpack_params(_PARAMS, params, cls.name)
        if not 1 <= bits <= MAX_BITS or block < 1:
            raise DecodeError(f"uniform: bits={bits} or block={block} out of range")
        nblocks = -(-k // block)
        per_block = 1 if bits == 1 else 2
        expect_nbytes(data, 4 * per_block * nblocks + _bits.fixed_nbytes(k, bits), cls.name)
        if k == 0:
            return torch.empty(0, dtype=ctx.dtype, device=data.device)
        scales = from_bytes(data[: 4 * per_block * nblocks], torch.float32).to(torch.float64).reshape(nblocks, per_block)
        if bool((scales < 0).any()):
            raise DecodeError("uniform: negative block scale")
        if bits > 1 and bool((scales[:, 0] > scales[:, 1]).any()):
            raise DecodeError("uniform: a block's smallest magnitude exceeds its largest")
        codes = _bits.unpack_fixed(data[4 * per_block * nblocks :], bits, k)
        sign = 1.0 - 2.0 * (codes & 1).to(torch.float64)
        which = _block_of(k, block, data.device)
        if bits == 1:
            return (sign * scales[:, 0].index_select(0, which)).to(ctx.dtype)
        steps = (1 << (bits - 1)) - 1
        low, high = scales[:, 0].index_select(0, which), scales[:, 1].index_select(0, which)
        magnitude = low + (high - low) * ((codes >> 1).to(torch.float64) / steps)
        return (sign * magnitude).to(ctx.dtype)

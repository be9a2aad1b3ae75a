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

Cost: ``bits`` per value plus one (``bits = 1``) or two scales per block, each 32 bits,
or 16 with ``scale=bf16`` (bfloat16 keeps fp32's range with an 8-bit mantissa: a scale
off by at most 0.4 %, which error feedback absorbs; at 1 bit and blocks of 128 the
scales then cost 0.125 bits per value instead of 0.25). Non-finite values give a
non-finite scale, so the whole block decodes non-finite and overflow checks downstream
still fire.
"""

from __future__ import annotations

import struct
from typing import Sequence

import torch

from ... import _bits
from ...errors import DecodeError
from ...options import Option
from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, unpack_params

_PARAMS = "<BI"  # bits, block size (fp32 scales)
_PARAMS_SCALED = "<BIB"  # bits, block size, scale dtype code (payloads with another scale dtype)
MAX_BITS = 8
SCALE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SCALE_CODES = {"fp32": 0, "bf16": 1}
_CODE_SCALES = {code: name for name, code in _SCALE_CODES.items()}


def _read_params(params: bytes) -> tuple[int, int, torch.dtype]:
    if len(params) == struct.calcsize(_PARAMS_SCALED):
        bits, block, code = unpack_params(_PARAMS_SCALED, params, "uniform")
        if code not in _CODE_SCALES:
            raise DecodeError(f"uniform: unknown scale dtype code {code}")
        return bits, block, SCALE_DTYPES[_CODE_SCALES[code]]
    bits, block = unpack_params(_PARAMS, params, "uniform")
    return bits, block, torch.float32


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
        Option("scale", str, "fp32", "dtype of the block scales", choices=tuple(SCALE_DTYPES)),
    )

    def _params(self) -> tuple[bytes, torch.dtype]:
        bits, block, scale = self.config["bits"], self.config["block"], self.config["scale"]
        if scale == "fp32":  # the original layout: payloads readable by every version
            return struct.pack(_PARAMS, bits, block), torch.float32
        return struct.pack(_PARAMS_SCALED, bits, block, _SCALE_CODES[scale]), SCALE_DTYPES[scale]

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        return self._encode(values, ctx, decoded=False)[0]

    def encode_decoded(self, values: torch.Tensor, ctx: CodecContext) -> tuple[ValueEncoding, torch.Tensor | None]:
        # The levels and scales are at hand: the decoded values without unpacking the bits.
        return self._encode(values, ctx, decoded=True)

    def _encode(self, values: torch.Tensor, ctx: CodecContext, decoded: bool) -> tuple[ValueEncoding, torch.Tensor | None]:
        """The encoding, and (``decoded``) what :meth:`decode` makes of it, computed as it does."""
        bits, block = self.config["bits"], self.config["block"]
        k = values.numel()
        params, scale_dtype = self._params()
        if k == 0:
            return ValueEncoding(values.new_empty(0, dtype=torch.uint8), params), torch.empty(0, dtype=ctx.dtype, device=values.device)
        wide = values.to(torch.float64)
        magnitude = _blocks(wide.abs(), block)
        signs = torch.signbit(wide).to(torch.int64)
        sign = (1.0 - 2.0 * signs.to(torch.float64)) if decoded else None
        if bits == 1:
            counts = torch.full((magnitude.shape[0],), float(block), dtype=torch.float64, device=values.device)
            counts[-1] = k - block * (magnitude.shape[0] - 1)
            scales = (magnitude.sum(dim=1) / counts).to(scale_dtype)  # NaN/inf propagate
            part = ValueEncoding(torch.cat([as_bytes(scales), _bits.pack_fixed(signs, 1)]), params)
            if not decoded:
                return part, None
            per_value = scales.to(torch.float64).unsqueeze(1).expand(magnitude.shape).reshape(-1)[:k]
            return part, (sign * per_value).to(ctx.dtype)
        steps = (1 << (bits - 1)) - 1
        high = magnitude.amax(dim=1)
        low = magnitude.amin(dim=1)
        last = k - magnitude.shape[1] * (magnitude.shape[0] - 1)  # values in the last block
        if last < magnitude.shape[1]:  # its zero padding is no magnitude
            low[-1] = magnitude[-1, :last].amin()
        scales = torch.stack([low, high], dim=1).to(scale_dtype)  # as the receiver sees them
        low64, high64 = (scales[:, 0].to(torch.float64), scales[:, 1].to(torch.float64))
        # Per block, broadcast over its row (no per-value gather of the block's scales).
        span = (high64 - low64).unsqueeze(1)
        usable = torch.isfinite(span) & (span > 0)
        unit = torch.where(usable, (magnitude - low64.unsqueeze(1)) / torch.where(usable, span, 1.0), 0.0)
        level = torch.round(unit * steps).clamp_(0, steps).to(torch.int64).reshape(-1)[:k]
        codes = (level << 1) | signs
        part = ValueEncoding(torch.cat([as_bytes(scales.reshape(-1)), _bits.pack_fixed(codes, bits)]), params)
        if not decoded:
            return part, None
        width = magnitude.shape[1]
        low = low64.unsqueeze(1).expand(-1, width).reshape(-1)[:k]
        high = high64.unsqueeze(1).expand(-1, width).reshape(-1)[:k]
        return part, (sign * (low + (high - low) * (level.to(torch.float64) / steps))).to(ctx.dtype)

    def packs(self, run_counts: Sequence[Sequence[int]]) -> bool:
        # A block spanning two runs would share one scale between them.
        block = self.config["block"]
        return all(count % block == 0 for counts in run_counts[:-1] for count in counts)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        bits, block = self.config["bits"], self.config["block"]
        params, scale_dtype = self._params()
        width = scale_dtype.itemsize
        scales = 0 if k == 0 else width * (1 if bits == 1 else 2) * -(-k // block)
        return PartSize(scales + _bits.fixed_nbytes(k, bits), len(params))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        bits, block, scale_dtype = _read_params(params)
        if not 1 <= bits <= MAX_BITS or block < 1:
            raise DecodeError(f"uniform: bits={bits} or block={block} out of range")
        nblocks = -(-k // block)
        per_block = 1 if bits == 1 else 2
        scale_bytes = scale_dtype.itemsize * per_block * nblocks
        expect_nbytes(data, scale_bytes + _bits.fixed_nbytes(k, bits), cls.name)
        if k == 0:
            return torch.empty(0, dtype=ctx.dtype, device=data.device)
        scales = from_bytes(data[:scale_bytes], scale_dtype).to(torch.float64).reshape(nblocks, per_block)
        if bool((scales < 0).any()):
            raise DecodeError("uniform: negative block scale")
        if bits > 1 and bool((scales[:, 0] > scales[:, 1]).any()):
            raise DecodeError("uniform: a block's smallest magnitude exceeds its largest")
        codes = _bits.unpack_fixed(data[scale_bytes:], bits, k)
        sign = 1.0 - 2.0 * (codes & 1).to(torch.float64)
        which = _block_of(k, block, data.device)
        if bits == 1:
            return (sign * scales[:, 0].index_select(0, which)).to(ctx.dtype)
        steps = (1 << (bits - 1)) - 1
        low, high = scales[:, 0].index_select(0, which), scales[:, 1].index_select(0, which)
        magnitude = low + (high - low) * ((codes >> 1).to(torch.float64) / steps)
        return (sign * magnitude).to(ctx.dtype)

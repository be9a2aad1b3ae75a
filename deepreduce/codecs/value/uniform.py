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

When several tensors share a payload (``CodecContext.runs``: their value counts), blocks
restart at each tensor unless they already line up, and the counts travel in the
parameters (4 bytes each): each tensor's values are coded as in a payload of its own.
"""

from __future__ import annotations

import struct
from typing import Sequence

import torch

from ... import _bits
from ...errors import DecodeError
from ...options import Option
from .. import CodecContext, PartSize, ValueCodec, ValueEncoding, register_value_codec
from .._common import as_bytes, expect_nbytes, from_bytes, pack_runs, run_of_each, unpack_params, unpack_runs

_PARAMS = "<BI"  # bits, block size (fp32 scales)
_PARAMS_SCALED = "<BIB"  # bits, block size, scale dtype code (payloads with another scale dtype)
_PARAMS_RUNS = "<BIBI"  # bits, block size, scale dtype code, run count; then one uint32 per run
MAX_BITS = 8
SCALE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SCALE_CODES = {"fp32": 0, "bf16": 1}
_CODE_SCALES = {code: name for name, code in _SCALE_CODES.items()}


def _read_params(params: bytes, k: int) -> tuple[int, int, torch.dtype, tuple[int, ...] | None]:
    """bits, block, scale dtype and the runs (None: one run) of a payload of ``k`` values."""
    head = struct.calcsize(_PARAMS_RUNS)
    if len(params) >= head:
        bits, block, code, count = struct.unpack(_PARAMS_RUNS, params[:head])
        if len(params) != head + 4 * count:
            raise DecodeError(f"uniform: parameter block has {len(params)} bytes, {count} runs need {head + 4 * count}")
        runs = unpack_runs(params[head:], k, "uniform")
    elif len(params) == struct.calcsize(_PARAMS_SCALED):
        (bits, block, code), runs = unpack_params(_PARAMS_SCALED, params, "uniform"), None
    else:
        (bits, block), code, runs = unpack_params(_PARAMS, params, "uniform"), _SCALE_CODES["fp32"], None
    if code not in _CODE_SCALES:
        raise DecodeError(f"uniform: unknown scale dtype code {code}")
    return bits, block, SCALE_DTYPES[_CODE_SCALES[code]], runs


class _Layout:
    """Where each of ``k`` values sits in the (rows, width) grid of blocks: consecutive
    values fill blocks of ``block``, restarting at each run (a tensor's values, when
    several share a payload), so no block spans two runs. A grid row is a block; the
    grid's zero (or ``fill``) padding ends each run's last block."""

    def __init__(self, k: int, block: int, runs: tuple[int, ...] | None, device: torch.device) -> None:
        self.k = k
        self.single = runs is None or len(runs) < 2
        if self.single:
            runs = (k,)
        self.width = min(block, max(runs))  # a block larger than every run: never allocate the rest
        per_run = [-(-count // block) for count in runs]
        self.rows = sum(per_run)
        if self.single:
            self.counts = torch.full((self.rows,), float(block), dtype=torch.float64, device=device)
            if self.rows:
                self.counts[-1] = k - block * (self.rows - 1)
            return
        counts, run = run_of_each(runs, device)
        local = torch.arange(k, device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, run)
        first_row = torch.tensor([0, *per_run[:-1]], device=device).cumsum(0)
        self.row = first_row.index_select(0, run) + local // block
        self.col = local % block
        self.counts = torch.bincount(self.row, minlength=self.rows).to(torch.float64)

    def grid(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``values`` (float64, one per value) in their blocks, ``fill`` elsewhere (a view
        of ``values`` when every block is whole: do not write to it)."""
        if self.single:
            if self.k == self.rows * self.width:  # whole blocks: the values themselves, no padding
                return values.reshape(self.rows, self.width)
            padded = torch.full((self.rows * self.width,), fill, dtype=torch.float64, device=values.device)
            padded[: self.k] = values
            return padded.reshape(self.rows, self.width)
        grid = torch.full((self.rows, self.width), fill, dtype=torch.float64, device=values.device)
        grid[self.row, self.col] = values
        return grid

    def values(self, grid: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`grid`: one entry per value, in order."""
        if self.single:
            return grid.reshape(-1)[: self.k]
        return grid[self.row, self.col]

    def per_value(self, per_block: torch.Tensor) -> torch.Tensor:
        """A block's number for each of its values."""
        if self.single:
            return per_block.unsqueeze(1).expand(self.rows, self.width).reshape(-1)[: self.k]
        return per_block.index_select(0, self.row)


def _signed_scales(negative: torch.Tensor, scales: torch.Tensor, layout: _Layout, dtype: torch.dtype) -> torch.Tensor:
    """A 1-bit payload's values: each block's scale, negated where the sign bit is set.
    The sender (its own values, for the residual) and the receivers compute it alike.
    A scale converts to ``dtype`` and negates exactly as the signed product would round,
    so this is ``(sign * scale).to(dtype)`` computed in the narrow dtype (on the CPU the
    fresh pages of float64 temporaries cost more than the arithmetic)."""
    sign = negative.to(dtype).mul_(-2.0).add_(1.0)  # exactly -1 or 1 (torch.where is slower on the CPU)
    return sign.mul_(layout.per_value(scales.to(dtype).contiguous()))


@register_value_codec
class UniformValueCodec(ValueCodec):
    name = "uniform"
    description = "deterministic sign + evenly spaced magnitude levels per block (1 bit: sign x mean |v|)"
    lossless = False
    codes_runs = True
    options = (
        Option("bits", int, 2, f"bits per value (1..{MAX_BITS})", check=lambda v: 1 <= v <= MAX_BITS, check_text=f"must be in [1, {MAX_BITS}]"),
        Option("block", int, 128, "values per scale", check=lambda v: 1 <= v <= (1 << 31) - 1, check_text="must be in [1, 2^31-1]"),
        Option("scale", str, "fp32", "dtype of the block scales", choices=tuple(SCALE_DTYPES)),
    )

    def _params(self, runs: tuple[int, ...] | None = None) -> tuple[bytes, torch.dtype]:
        bits, block, scale = self.config["bits"], self.config["block"], self.config["scale"]
        if runs is not None:
            return (struct.pack(_PARAMS_RUNS, bits, block, _SCALE_CODES[scale], len(runs)) + pack_runs(runs),
                    SCALE_DTYPES[scale])
        if scale == "fp32":  # the original layout: payloads readable by every version
            return struct.pack(_PARAMS, bits, block), torch.float32
        return struct.pack(_PARAMS_SCALED, bits, block, _SCALE_CODES[scale]), SCALE_DTYPES[scale]

    def _runs(self, runs: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """The runs to write: None where blocks of the whole already restart at every run."""
        block = self.config["block"]
        if runs is None or len(runs) < 2 or all(count % block == 0 for count in runs[:-1]):
            return None
        return tuple(runs)

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        return self._encode(values, ctx, decoded=False)[0]

    def encode_decoded(self, values: torch.Tensor, ctx: CodecContext) -> tuple[ValueEncoding, torch.Tensor | None]:
        # The levels and scales are at hand: the decoded values without unpacking the bits.
        return self._encode(values, ctx, decoded=True)

    def _encode(self, values: torch.Tensor, ctx: CodecContext, decoded: bool) -> tuple[ValueEncoding, torch.Tensor | None]:
        """The encoding, and (``decoded``) what :meth:`decode` makes of it, computed as it does."""
        bits, block = self.config["bits"], self.config["block"]
        k = values.numel()
        runs = self._runs(ctx.runs)
        if runs is not None and sum(runs) != k:
            raise ValueError(f"uniform: runs of {sum(runs)} values for {k} values")
        params, scale_dtype = self._params(runs)
        if k == 0:
            return ValueEncoding(values.new_empty(0, dtype=torch.uint8), params), torch.empty(0, dtype=ctx.dtype, device=values.device)
        layout = _Layout(k, block, runs, values.device)
        if bits == 1:
            negative = torch.signbit(values)
            magnitude = layout.grid(values.to(torch.float64).abs_())
            scales = (magnitude.sum(dim=1) / layout.counts).to(scale_dtype)  # NaN/inf propagate
            part = ValueEncoding(torch.cat([as_bytes(scales), _bits.pack_bool(negative)]), params)
            return part, (_signed_scales(negative, scales, layout, ctx.dtype) if decoded else None)
        wide = values.to(torch.float64)
        magnitude = layout.grid(wide.abs())
        signs = torch.signbit(wide).to(torch.int64)
        sign = (1.0 - 2.0 * signs.to(torch.float64)) if decoded else None
        steps = (1 << (bits - 1)) - 1
        high = magnitude.amax(dim=1)
        # The zero padding is no magnitude: the smallest over the values only.
        low = magnitude.amin(dim=1) if layout.single and k % layout.width == 0 else \
            layout.grid(wide.abs(), fill=float("inf")).amin(dim=1)
        scales = torch.stack([low, high], dim=1).to(scale_dtype)  # as the receiver sees them
        low64, high64 = (scales[:, 0].to(torch.float64), scales[:, 1].to(torch.float64))
        # Per block, broadcast over its row (no per-value gather of the block's scales).
        span = (high64 - low64).unsqueeze(1)
        usable = torch.isfinite(span) & (span > 0)
        unit = torch.where(usable, (magnitude - low64.unsqueeze(1)) / torch.where(usable, span, 1.0), 0.0)
        level = layout.values(torch.round(unit * steps).clamp_(0, steps).to(torch.int64))
        codes = (level << 1) | signs
        part = ValueEncoding(torch.cat([as_bytes(scales.reshape(-1)), _bits.pack_fixed(codes, bits)]), params)
        if not decoded:
            return part, None
        low, high = layout.per_value(low64), layout.per_value(high64)
        return part, (sign * (low + (high - low) * (level.to(torch.float64) / steps))).to(ctx.dtype)

    def packs(self, run_counts: Sequence[Sequence[int]]) -> bool:
        # Blocks restart at each run; a run shorter than a block would be coded in a
        # narrower grid on its own, and a block mean summed in another order.
        block = self.config["block"]
        return all(count == 0 or count >= block for counts in run_counts for count in counts)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        return self.encoded_size_runs(numel, (k,), dtype)

    def encoded_size_runs(self, numel: int, runs: Sequence[int], dtype: torch.dtype) -> PartSize:
        bits, block = self.config["bits"], self.config["block"]
        params, scale_dtype = self._params(self._runs(tuple(runs)))
        blocks = sum(-(-count // block) for count in runs)
        scales = scale_dtype.itemsize * (1 if bits == 1 else 2) * blocks
        return PartSize(scales + _bits.fixed_nbytes(sum(runs), bits), len(params))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        bits, block, scale_dtype, runs = _read_params(params, k)
        if not 1 <= bits <= MAX_BITS or block < 1:
            raise DecodeError(f"uniform: bits={bits} or block={block} out of range")
        nblocks = sum(-(-count // block) for count in (runs or (k,)))
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
        layout = _Layout(k, block, runs, data.device)
        if bits == 1:
            negative = _bits.bitmap_to_bool(data[scale_bytes:], k)
            return _signed_scales(negative, scales[:, 0], layout, ctx.dtype)
        codes = _bits.unpack_fixed(data[scale_bytes:], bits, k)
        sign = 1.0 - 2.0 * (codes & 1).to(torch.float64)
        steps = (1 << (bits - 1)) - 1
        low, high = layout.per_value(scales[:, 0].contiguous()), layout.per_value(scales[:, 1].contiguous())
        magnitude = low + (high - low) * ((codes >> 1).to(torch.float64) / steps)
        return (sign * magnitude).to(ctx.dtype)

"""Shared machinery of the curve-fitting value codecs (``polyfit``, ``dexp``).

Values are sorted (descending, stable), which splits them into a positive part, the
zeros and a negative part. Each non-empty sign part is a sequence of magnitudes in
descending order -- a smooth, monotone curve -- that is cut into segments and fitted
per segment by the codec over ``x`` scaled to ``[0, 1]``. The payload holds the
curves and the permutation from sorted order back to ascending-index order,
bit-packed at ``ceil(log2 k)`` bits per value (the dominant cost). Signs travel for free: the part a position belongs to is its
sign.

The receiver evaluates the curves, clamps each part into the exact ``[min, max]``
of its magnitudes (sent in float64) and takes a running minimum, so every decoded
value has the sign of the true value (zeros stay exactly zero) and, within a sign,
a larger true magnitude never decodes to a smaller one.

Payload layout (value part; every field is validated before use)::

    params: coefficient-count argument (u8), flags (u8), n_pos (u64), n_zero (u64),
            segments of the positive part (u16), segments of the negative part (u16)
    data:   segment sizes int64[S], bounds float64[4] (pos min/max, neg min/max),
            coefficients float64[S * ncoef], permutation (ceil(log2 k) bits each)

Flag bit 0 marks a payload whose input held inf/NaN: it carries nothing and decodes
to all-NaN values, so the overflow still reaches every receiver.
"""

from __future__ import annotations

import struct
from typing import ClassVar

import torch

from .. import _bits
from ..errors import DecodeError
from . import CodecContext, ValueCodec, ValueEncoding
from ._common import as_bytes, expect_nbytes, from_bytes, unpack_params

_PARAMS = "<BBQQHH"
_NONFINITE = 1
MAX_SEGMENTS = 256


# --- permutation packing -------------------------------------------------------------


def permutation_width(k: int) -> int:
    """``ceil(log2 k)`` bits per element (0 for k <= 1)."""
    return max(0, (k - 1).bit_length())


def permutation_nbytes(k: int) -> int:
    return _bits.fixed_nbytes(k, permutation_width(k))


def pack_permutation(order: torch.Tensor) -> torch.Tensor:
    """Bit-pack a permutation of ``0..k-1`` at ``ceil(log2 k)`` bits per element."""
    return _bits.pack_fixed(order.to(torch.int64), permutation_width(order.numel()))


def unpack_permutation(data: torch.Tensor, k: int, codec: str) -> torch.Tensor:
    """Inverse of :func:`pack_permutation`; anything but a permutation is a :class:`DecodeError`."""
    expect_nbytes(data, permutation_nbytes(k), codec, "permutation")
    order = _bits.unpack_fixed(data, permutation_width(k), k)
    if k and (bool((order >= k).any()) or not bool((torch.bincount(order, minlength=k) == 1).all())):
        raise DecodeError(f"{codec}: permutation field is not a permutation of 0..{k - 1}")
    return order


# --- segments ------------------------------------------------------------------------


def segment_grid(sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments of the given sizes laid end to end: each element's segment number
    and its position ``x`` in ``[0, 1]`` within the segment (0 for one-element segments)."""
    device = sizes.device
    n = int(sizes.sum())
    segment = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    local = torch.arange(n, device=device) - starts[segment]
    span = (sizes - 1).clamp(min=1).to(torch.float64)
    return segment, local.to(torch.float64) / span[segment]


_HEAD_DIVISORS = (5, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000, 300000, 1000000)
_MIN_SEGMENT = 30


def head_segments(n: int) -> list[int]:
    """Segment sizes for ``n`` descending magnitudes: short segments at the steep head,
    of about ``n/1000, n/300, n/100, n/30, n/10, n/5`` values (those above 30), then the
    rest as one tail segment."""
    head = [n // divisor for divisor in _HEAD_DIVISORS if n // divisor > _MIN_SEGMENT]
    head.reverse()  # smallest segments at the steep head
    return head + [n - sum(head)]


def unit_grid(n: int, device: torch.device) -> torch.Tensor:
    """``n`` points evenly spaced over ``[0, 1]`` (``[0]`` for a single point), float64."""
    return torch.arange(n, dtype=torch.float64, device=device) / max(n - 1, 1)


class SortedCurveCodec(ValueCodec):
    """Base of value codecs that fit curves to sorted magnitudes; see the module docstring.

    A subclass defines how a part is cut into segments, how one segment is fitted
    (``ncoef`` float64 numbers) and how the coefficients are evaluated."""

    lossless: ClassVar[bool] = False

    # -- what a subclass defines --

    def coefficient_arg(self) -> int:
        """The byte written to the params that fixes ``ncoef`` (e.g. the degree)."""
        return 0

    @classmethod
    def coefficient_count(cls, arg: int) -> int:
        raise NotImplementedError

    def segment_sizes(self, n: int) -> list[int]:
        return [n]

    def fit_segment(self, magnitude: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Coefficients for descending float64 ``magnitude`` sampled at ``x`` in [0, 1]."""
        raise NotImplementedError

    @classmethod
    def check_coefficients(cls, coefficients: torch.Tensor) -> None:
        """Raise :class:`DecodeError` for coefficients no encoder produces."""

    @classmethod
    def evaluate(cls, coefficients: torch.Tensor, segment: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Magnitudes at ``x`` of each element's segment curve (``coefficients[segment]``)."""
        raise NotImplementedError

    # -- shared encode / decode --

    def _fit_part(self, magnitude: torch.Tensor, ncoef: int) -> tuple[list[int], torch.Tensor]:
        sizes = [s for s in self.segment_sizes(magnitude.numel()) if s > 0]
        coefficients = []
        start = 0
        for size in sizes:
            segment = magnitude[start : start + size]
            fitted = self.fit_segment(segment, unit_grid(size, magnitude.device))
            if not bool(torch.isfinite(fitted).all()):
                # Extreme inputs (near float64's range): fall back to a flat curve; the
                # receiver's clamp to the part's [min, max] keeps it in range.
                fitted = torch.zeros(ncoef, dtype=torch.float64, device=magnitude.device)
            coefficients.append(fitted)
            start += size
        return sizes, torch.stack(coefficients) if coefficients else magnitude.new_zeros((0, ncoef))

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        arg = self.coefficient_arg()
        ncoef = self.coefficient_count(arg)
        device = values.device
        wide = values.to(torch.float64)
        if not bool(torch.isfinite(wide).all()):
            return ValueEncoding(torch.empty(0, dtype=torch.uint8, device=device), struct.pack(_PARAMS, arg, _NONFINITE, 0, 0, 0, 0))
        ordered, order = torch.sort(wide, descending=True, stable=True)
        n_pos = int(torch.count_nonzero(ordered > 0))
        n_zero = int(torch.count_nonzero(ordered == 0))
        positive = ordered[:n_pos]
        negative = (-ordered[n_pos + n_zero :]).flip(0)  # magnitudes, descending
        sizes, coefficients, bounds = [], [], []
        counts = []
        for part in (positive, negative):
            part_sizes, part_coefficients = self._fit_part(part, ncoef)
            sizes += part_sizes
            coefficients.append(part_coefficients)
            counts.append(len(part_sizes))
            bounds += [part.min(), part.max()] if part.numel() else [wide.new_zeros(()), wide.new_zeros(())]
        if max(counts) > MAX_SEGMENTS:
            raise ValueError(f"{self.name}: more than {MAX_SEGMENTS} segments in one part")
        data = torch.cat([
            as_bytes(torch.tensor(sizes, dtype=torch.int64, device=device)),
            as_bytes(torch.stack(bounds)),
            as_bytes(torch.cat(coefficients).reshape(-1)),
            pack_permutation(order),
        ])
        return ValueEncoding(data, struct.pack(_PARAMS, arg, 0, n_pos, n_zero, counts[0], counts[1]))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        arg, flags, n_pos, n_zero, segs_pos, segs_neg = unpack_params(_PARAMS, params, cls.name)
        ncoef = cls.coefficient_count(arg)
        device = data.device
        if flags == _NONFINITE:
            if n_pos or n_zero or segs_pos or segs_neg:
                raise DecodeError(f"{cls.name}: non-finite payload with non-empty fields")
            expect_nbytes(data, 0, cls.name)
            return torch.full((k,), float("nan"), dtype=ctx.dtype, device=device)
        if flags:
            raise DecodeError(f"{cls.name}: unknown flags {flags:#x}")
        if n_pos + n_zero > k:
            raise DecodeError(f"{cls.name}: part sizes {n_pos}+{n_zero} exceed k={k}")
        n_neg = k - n_pos - n_zero
        for count, segs in ((n_pos, segs_pos), (n_neg, segs_neg)):
            if not (1 <= segs <= min(count, MAX_SEGMENTS) if count else segs == 0):
                raise DecodeError(f"{cls.name}: {segs} segments impossible for a part of {count} values")
        nsegs = segs_pos + segs_neg
        head = 8 * nsegs + 32 + 8 * nsegs * ncoef
        expect_nbytes(data, head + permutation_nbytes(k), cls.name)
        sizes = from_bytes(data[: 8 * nsegs], torch.int64)
        bounds = from_bytes(data[8 * nsegs : 8 * nsegs + 32], torch.float64)
        coefficients = from_bytes(data[8 * nsegs + 32 : head], torch.float64).reshape(nsegs, ncoef)
        if bool(((sizes < 1) | (sizes > k)).any()) or int(sizes[:segs_pos].sum()) != n_pos or int(sizes[segs_pos:].sum()) != n_neg:
            raise DecodeError(f"{cls.name}: segment sizes do not add up to the part sizes ({n_pos}, {n_neg})")
        if not bool(torch.isfinite(bounds).all()) or not bool(torch.isfinite(coefficients).all()):
            raise DecodeError(f"{cls.name}: non-finite bounds or coefficients")
        cls.check_coefficients(coefficients)
        order = unpack_permutation(data[head:], k, cls.name)
        parts = []
        for count, low, high, seg_range in ((n_pos, bounds[0], bounds[1], slice(0, segs_pos)), (n_neg, bounds[2], bounds[3], slice(segs_pos, nsegs))):
            if not count:
                parts.append(torch.empty(0, dtype=torch.float64, device=device))
                continue
            if not bool((low > 0) & (low <= high)):
                raise DecodeError(f"{cls.name}: magnitude bounds [{float(low)}, {float(high)}] invalid")
            segment, x = segment_grid(sizes[seg_range])
            magnitude = cls.evaluate(coefficients[seg_range], segment, x)
            magnitude = torch.nan_to_num(magnitude, nan=float(low)).clamp_(low, high)
            parts.append(torch.cummin(magnitude, 0).values)
        ordered = torch.cat([parts[0], torch.zeros(n_zero, dtype=torch.float64, device=device), -parts[1].flip(0)])
        out = torch.empty(k, dtype=torch.float64, device=device)
        out[order] = ordered
        return out.to(ctx.dtype)

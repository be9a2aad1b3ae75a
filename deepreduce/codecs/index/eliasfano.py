"""``eliasfano`` index codec: the Elias-Fano split applied to the index gaps.

Each gap ``g_i = idx_i - idx_{i-1} - 1`` (``g_0 = idx_0``) is cut into its low ``l``
bits, stored in a fixed-width packed array, and its high part ``g_i >> l``, stored
in unary in a separate bitmap (``high_i`` zeros, then a one). Keeping the two
streams apart is what makes decoding vectorised: the positions of the ones give
every high part at once.

Coding the gaps rather than the absolute indices (classic Elias-Fano) never costs
more for the same ``l`` -- the unary stream holds ``sum(g_i >> l) <= (d - r) >> l``
zeros instead of ``d >> l`` -- and it is near the entropy bound ``log2 C(d, r)`` for
scattered sets, where classic Elias-Fano is well above it. ``l`` is chosen per payload to minimise the size.
"""

from __future__ import annotations

import struct
from typing import Union

import numpy as np
import torch

from ... import _bits
from ...errors import DecodeError
from .. import CodecContext, IndexCodec, IndexEncoding, PartSize, register_index_codec
from .._common import expect_nbytes, unpack_params

_PARAMS = "<BQ"  # low-bit width l, length of the unary stream in bits


# The coding arithmetic below takes torch tensors or, for CPU tensors, numpy arrays on
# their memory (numpy's cost per operation is a fraction of torch's, and a step codes
# many small index sets); both give the same bytes.
Array = Union[torch.Tensor, np.ndarray]


def gaps_of(indices: Array) -> Array:
    """``g_0 = idx_0``, ``g_i = idx_i - idx_{i-1} - 1``: non-negative for ascending unique indices."""
    if isinstance(indices, np.ndarray):  # one new array, the rest in place (fresh pages cost more than the passes)
        gaps = np.empty_like(indices)
        if indices.size:
            gaps[0] = indices[0]
            np.subtract(indices[1:], indices[:-1], out=gaps[1:])
            gaps[1:] -= 1
        return gaps
    gaps = torch.empty_like(indices)
    if indices.numel():
        gaps[0] = indices[0]
        torch.sub(indices[1:], indices[:-1] + 1, out=gaps[1:])
    return gaps


def indices_from_gaps(gaps: Array, in_place: bool = False) -> Array:
    """The inverse of :func:`gaps_of`; ``in_place`` reuses ``gaps``' memory (fresh pages
    cost more than these passes on the CPU)."""
    if not in_place:
        return (gaps + 1).cumsum(0) - 1
    gaps += 1
    if isinstance(gaps, np.ndarray):
        np.cumsum(gaps, out=gaps)
    else:
        gaps.cumsum_(0)
    gaps -= 1
    return gaps


def guess_low_width(numel: int, k: int) -> int:
    """floor(log2(d/r)): the classic Elias-Fano split, the centre of the search."""
    return max(0, (max(numel, 1) // k).bit_length() - 1)


def size_bound(numel: int, k: int) -> int:
    """Most bytes the index part can take for ``k`` of ``numel`` indices.

    At the guessed width ``l`` the part holds ``k*l`` low bits and ``k + sum(g >> l)``
    unary bits, and ``sum(g >> l) <= (sum g) >> l <= (numel - k) >> l``; the chosen
    width never needs more bits than the guess, and the two streams' rounding to whole
    32-bit words adds under 8 bytes."""
    if k == 0:
        return 0
    low = guess_low_width(numel, k)
    return (k * low + k + ((numel - k) >> low)) // 8 + 8


def _candidate_widths(numel: int, k: int) -> range:
    guess = guess_low_width(numel, k)
    return range(max(0, guess - 2), min(guess + 3, 63))


def _arange(like: Array, start: int, stop: int) -> Array:
    if isinstance(like, np.ndarray):
        return np.arange(start, stop)
    return torch.arange(start, stop, device=like.device)


def best_low_width(gaps: Array, numel: int) -> int:
    """The ``l`` that minimises ``r*l + sum(g >> l)`` (evaluated around log2(d/r)); the
    first such ``l`` on ties."""
    k = len(gaps)
    candidates = _candidate_widths(numel, k)
    if k <= 1 << 16:  # one broadcast op instead of one pass per candidate (per-call cost dominates here)
        widths = _arange(gaps, candidates.start, candidates.stop)
        costs = (gaps[None] >> widths[:, None]).sum(1) + k * widths
    else:
        costs = [(gaps >> l).sum() + k * l for l in candidates]
        costs = torch.stack(costs) if isinstance(gaps, torch.Tensor) else np.array(costs)
    return candidates[int(costs.argmin())]


def encode_ascending(indices: torch.Tensor, numel: int) -> tuple[torch.Tensor, int, int]:
    """``(bytes, low-bit width, unary bits)`` of ascending unique ``indices`` in ``[0, numel)``."""
    k = indices.numel()
    if k == 0:
        return indices.new_empty(0, dtype=torch.uint8), 0, 0
    array = _bits.host_array(indices)
    gaps = gaps_of(indices if array is None else array.astype(np.int64, copy=False))
    low_width = best_low_width(gaps, numel)
    terminators = (gaps >> low_width).cumsum(0) + _arange(gaps, 0, k)
    nbits = int(terminators[-1]) + 1
    low = _bits.pack_fixed(torch.as_tensor(gaps & ((1 << low_width) - 1)), low_width)
    unary = _bits.pack_bitmap(torch.as_tensor(terminators), nbits)
    return torch.cat([low, unary]), low_width, nbits


def decode_ascending(data: torch.Tensor, low_width: int, nbits: int, k: int, numel: int, codec: str = "eliasfano") -> torch.Tensor:
    """The ``k`` indices :func:`encode_ascending` wrote; :class:`DecodeError` (naming
    ``codec``) on bad input."""
    if k == 0:
        if low_width or nbits:
            raise DecodeError(f"{codec}: non-empty parameters for k=0")
        expect_nbytes(data, 0, codec)
        return torch.empty(0, dtype=torch.int64, device=data.device)
    if low_width > _bits.bit_length(numel):
        raise DecodeError(f"{codec}: low-bit width {low_width} too large for numel={numel}")
    if not k <= nbits <= k + ((numel - k) >> low_width):
        raise DecodeError(f"{codec}: unary stream of {nbits} bits impossible for k={k}, numel={numel}")
    low_bytes = _bits.fixed_nbytes(k, low_width)
    expect_nbytes(data, low_bytes + _bits.packed_nbytes(nbits), codec)
    terminators = _bits.bitmap_positions(data[low_bytes:], nbits)
    if terminators.numel() != k or int(terminators[-1]) != nbits - 1:
        raise DecodeError(f"{codec}: unary stream holds {terminators.numel()} terminators, expected {k}")
    low = _bits.unpack_fixed(data[:low_bytes], low_width, k)
    host = _bits.host_array(terminators) is not None
    # The unary stream's terminators are the high parts' positions: their gaps are the high
    # parts. One new array, the rest in place.
    gaps = gaps_of(terminators.numpy() if host else terminators)
    gaps <<= low_width
    gaps |= low.numpy() if host else low
    return torch.as_tensor(indices_from_gaps(gaps, in_place=True))


@register_index_codec
class EliasFanoIndexCodec(IndexCodec):
    name = "eliasfano"
    description = "Elias-Fano split of the index gaps (low bits packed, high bits unary); near the entropy bound"

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        data, low_width, nbits = encode_ascending(indices, ctx.numel)
        return IndexEncoding(data, struct.pack(_PARAMS, low_width, nbits), indices)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        # An upper bound (the unary stream's length depends on the gaps): about 0.5 bit
        # per index above a typical payload, which the gather pads to anyway.
        return PartSize(size_bound(numel, k), struct.calcsize(_PARAMS), exact=False)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        low_width, nbits = unpack_params(_PARAMS, params, cls.name)
        return decode_ascending(data, low_width, nbits, k, ctx.numel, cls.name)

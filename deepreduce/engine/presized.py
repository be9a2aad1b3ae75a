"""Gathering compressed buckets without exchanging their sizes first.

When every rank can compute every rank's message size -- an exact-k sparsifier, codecs
that declare their part sizes (:meth:`~deepreduce.codecs.IndexCodec.encoded_size`), the
same segments everywhere (the configuration agreement check makes sure of that) -- the
engine skips the blocking all-gather of sizes: each rank pads its message to the common
*width* (the largest message any rank can make, rounded up to 8 bytes) and the payload
all-gather is issued at once. A codec that declares a bound rather than an exact size
(``eliasfano``) costs that bound's slack in padding, under 1 bit per kept index.

The size exchange also carried two signals, which now travel in the message itself, so
every rank learns them from the gather and takes the same action:

- a rank whose compression failed sends ``int64 -1`` and raises its own error; the
  others raise :class:`~deepreduce.DeepReduceError` naming it;
- a rank whose bucket is not finite sends ``int64 -2 | int64 n | int64 code[n]`` with
  ``code = position * 4 + kind`` (kind 0 NaN, 1 +Inf, 2 -Inf) for each non-finite
  position of the bucket, or ``n = -1`` when they do not fit in the width (then the
  whole bucket counts as NaN). Every rank rolls back its error feedback and the averaged
  bucket holds those non-finite values at those positions, zeros elsewhere: the step
  carries nothing else (AMP's scaler skips it, as it would after a plain allreduce).

A normal message is a framed message (:mod:`deepreduce.engine.framing`), whose first
int64 is its entry count (>= 0), followed by zeros up to the width.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..compressor import Compressor
from ..errors import DecodeError
from ..wire import pad8
from .framing import framed_size

FAILED = -1  # a rank's compression failed (it raises its own error)
NONFINITE = -2  # a rank's bucket holds NaN or Inf
_EVERYWHERE = -1  # n of a NONFINITE message whose positions did not fit: the whole bucket is NaN
_KINDS = 4  # code = position * 4 + kind


def message_width(compressor: Compressor, segments: Sequence[int | tuple[int, Sequence[int] | None, bool]],
                  dtype: torch.dtype, min_numel: int, small_compressor: Compressor | None = None) -> int | None:
    """The padded size every rank's message for these segments fits in, or None when a
    payload's size depends on the data (then sizes must be exchanged). A segment is its
    element count, or ``(count, part counts, small)`` where its parts are sparsified each
    on its own budget (part counts; None: one budget) or it is a pack of small tensors
    (``small``: :meth:`Segment.is_small`). Small segments (an element count below
    ``min_numel``) travel as raw bytes, or through ``small_compressor`` when one is set."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    entries = []
    for segment in segments:
        numel, parts, small = (segment, None, segment < min_numel) if isinstance(segment, int) else segment
        if small and small_compressor is None:
            entries.append(numel * itemsize)
            continue
        if small:
            size = small_compressor.payload_size(numel, dtype)
        else:
            size = compressor.payload_size(numel, dtype, parts)
        if size is None:
            return None
        entries.append(size[0])
    # Room for the flag messages too (a count of 0 segments frames to 8 bytes).
    return pad8(max(framed_size(entries), 16))


def pad_to(message: torch.Tensor, width: int) -> torch.Tensor:
    """``message`` followed by zeros up to ``width`` bytes."""
    if message.numel() > width:
        raise RuntimeError(f"a message of {message.numel()} bytes exceeds its computed width of {width} "
                           "(a codec's encoded_size is wrong)")
    return torch.nn.functional.pad(message, (0, width - message.numel()))


def flag_of(message: torch.Tensor) -> int:
    """FAILED, NONFINITE, or 0 for a normal message."""
    head = int(message[:8].cpu().numpy().view("<i8")[0]) if message.numel() >= 8 else 0
    return head if head in (FAILED, NONFINITE) else 0


def failed_message(width: int, device: torch.device) -> torch.Tensor:
    head = np.array([FAILED], dtype="<i8").view(np.uint8)
    return pad_to(torch.from_numpy(head.copy()).to(device), width)


def nonfinite_message(buffer: torch.Tensor, width: int) -> torch.Tensor:
    """The message of a rank whose ``buffer`` is not finite: its non-finite positions and
    their kinds, or "everywhere" when they do not fit in ``width``."""
    positions = torch.nonzero(~torch.isfinite(buffer)).reshape(-1)
    room = (width - 16) // 8
    if positions.numel() > room:
        body = torch.tensor([NONFINITE, _EVERYWHERE], dtype=torch.int64)
    else:
        values = buffer[positions]
        kind = torch.where(torch.isnan(values), 0, torch.where(values > 0, 1, 2)).to(torch.int64)
        head = torch.tensor([NONFINITE, positions.numel()], dtype=torch.int64)
        body = torch.cat([head, positions.cpu() * _KINDS + kind.cpu()])
    data = torch.from_numpy(body.numpy().astype("<i8").view(np.uint8).copy())
    return pad_to(data.to(buffer.device), width)


def add_nonfinite(total: torch.Tensor, message: torch.Tensor, source: int) -> None:
    """Add a NONFINITE message's values at its positions into ``total`` (the bucket's
    accumulator), or make all of ``total`` NaN; DecodeError if the message is malformed."""
    n_bytes = message.numel()
    if n_bytes < 16:
        raise DecodeError(f"non-finite message from rank {source}: {n_bytes} bytes cannot hold its count")
    count = int(message[8:16].cpu().numpy().view("<i8")[0])
    if count == _EVERYWHERE:
        total.fill_(float("nan"))
        return
    if count < 0 or 16 + 8 * count > n_bytes:
        raise DecodeError(f"non-finite message from rank {source}: {count} positions do not fit in {n_bytes} bytes")
    codes = torch.from_numpy(message[16 : 16 + 8 * count].cpu().numpy().view("<i8").copy()).to(total.device)
    positions, kind = codes // _KINDS, codes % _KINDS
    if count and (bool((positions < 0).any()) or bool((positions >= total.numel()).any()) or bool((kind > 2).any())):
        raise DecodeError(f"non-finite message from rank {source}: a position or kind is out of range")
    values = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=total.dtype, device=total.device)[kind]
    total.index_add_(0, positions, values)

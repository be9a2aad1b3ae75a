"""One message per bucket and rank: the payloads of its segments, framed.

Layout (little endian)::

    int64 count | int64 size[count] | entries, each zero-padded to 8 bytes

An entry is a compressed payload (:mod:`deepreduce.wire`) or, for a segment too small to
compress, its raw bytes. Padding keeps every entry 8-byte aligned, so decoders can view
its parts as wider types without copying. When the gather width is computed rather than
exchanged (:mod:`deepreduce.engine.presized`), a message is followed by zeros up to it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import DecodeError
from ..wire import pad8


def frame(entries: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Pack 1-D uint8 ``entries`` into one message on ``device``."""
    sizes = np.array([len(entries)] + [entry.numel() for entry in entries], dtype="<i8")
    parts = [torch.from_numpy(sizes.view(np.uint8)).to(device)]
    for entry in entries:
        parts.append(entry.reshape(-1).to(device))
        gap = pad8(entry.numel()) - entry.numel()
        if gap:
            parts.append(torch.zeros(gap, dtype=torch.uint8, device=device))
    return torch.cat(parts)


def unframe(message: torch.Tensor, expected: int, source: str = "message", padded: bool = False) -> list[torch.Tensor]:
    """Split a message made by :func:`frame` back into its entries (views), validating
    the framing; :class:`DecodeError` naming ``source`` on any inconsistency.
    ``padded``: the message may be followed by zero bytes (a computed gather width)."""
    n = message.numel()
    if n < 8:
        raise DecodeError(f"{source}: {n} bytes cannot hold the entry count")
    head = message[:8].cpu().numpy().view("<i8")
    if int(head[0]) != expected:
        raise DecodeError(f"{source}: carries {int(head[0])} entries, expected {expected} (do all ranks reduce the same tensors?)")
    table_end = 8 * (expected + 1)
    if n < table_end:
        raise DecodeError(f"{source}: {n} bytes cannot hold the size table of {expected} entries")
    sizes = message[8:table_end].cpu().numpy().view("<i8")
    if (sizes < 0).any():
        raise DecodeError(f"{source}: negative entry size")
    # Each size is at most n before anything adds them, so the int64 sum cannot wrap around
    # (four sizes of 2^62 would otherwise add up to 0 and pass the total check).
    if (sizes > n).any():
        raise DecodeError(f"{source}: an entry size exceeds the message's {n} bytes")
    aligned = (sizes + 7) & ~7
    end = table_end + int(aligned.sum())
    if end != n and not (padded and end < n):
        raise DecodeError(f"{source}: entry sizes add up to {end} bytes, message has {n}")
    if end < n and bool(message[end:].any()):
        raise DecodeError(f"{source}: the padding after its {end} bytes is not zero")
    entries = []
    offset = table_end
    for size, step in zip(sizes.tolist(), aligned.tolist()):
        entries.append(message[offset : offset + size])
        offset += step
    return entries


def framed_size(entry_sizes: Sequence[int]) -> int:
    """Bytes of the message :func:`frame` makes from entries of these sizes."""
    return 8 * (len(entry_sizes) + 1) + sum(pad8(n) for n in entry_sizes)

"""How a rank reads what the others sent: one message split into its segments and checked,
the ranks' parts summed in rank order, and the small helpers every scheme shares (a
tensor's bytes, a segment's stream name, the finiteness check).

Every scheme (:mod:`~deepreduce.engine.pipeline`'s all-gather, the shared index, the
hierarchical schemes, ``compressor="auto"``'s probes) reads and sums through these, so
received bytes are checked alike and sums are bitwise the same on every rank."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from ..compressor import decode
from ..errors import DecodeError
from ..sparse import SparseGrad
from .framing import unframe
from .segments import Segment


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(entry: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if entry.storage_offset() % itemsize:
        entry = entry.clone()
    return entry.view(dtype)


# Elements of all ranks' sparse parts up to which one concatenated index_add_ beats one per rank.
_CONCATENATE_BELOW = 1 << 12


def sum_in_rank_order(target: torch.Tensor, parts: Sequence[torch.Tensor | SparseGrad], divisor: int = 1) -> None:
    """Add every rank's part (rank order) into ``target``, each divided by ``divisor`` first.

    Every position receives its contributions in rank order whatever the path, so the sum
    is bitwise the same on every rank. Small sparse parts on the CPU go in one
    ``index_add_`` over the ranks' concatenated (indices, values): its CPU kernel walks
    the index list in order, so that is the same sum as one ``index_add_`` per rank,
    minus W-1 calls (large ones are added one by one: there the copies would cost more
    than the calls). Elsewhere (CUDA's ``index_add_`` adds duplicate positions with
    atomics, in no fixed order) each rank's part, whose indices are unique, is added on
    its own."""
    dtype = target.dtype
    sparse = [p for p in parts if isinstance(p, SparseGrad)]
    if (len(sparse) == len(parts) and len(parts) > 1 and target.device.type == "cpu"
            and sum(p.indices.numel() for p in sparse) <= _CONCATENATE_BELOW):
        indices = torch.cat([p.indices for p in sparse])
        values = torch.cat([p.values.to(dtype) for p in sparse])  # a new tensor: divided in place
        target.index_add_(0, indices, values.div_(divisor) if divisor != 1 else values)
        return
    for part in parts:
        if isinstance(part, SparseGrad):
            values = part.values.to(dtype)
            target.index_add_(0, part.indices, values / divisor if divisor != 1 else values)
        else:
            values = part.to(dtype)
            target.add_(values / divisor if divisor != 1 else values)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. One read pass: a sum is finite only if every element
    is (NaN and Inf propagate; +Inf and -Inf make NaN); only a non-finite sum -- a
    non-finite element or an overflow of the sum itself -- pays for the exact,
    ~40x dearer element-wise check. A host sync on CUDA."""
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(tensor).all())


def stream_name(name: Hashable) -> int | str:
    return name if isinstance(name, (int, str)) and not isinstance(name, bool) else str(name)


def read_message(message: torch.Tensor, segments: Sequence[Segment], dtype: torch.dtype, min_numel: int,
                 source: int | str = "?", own: Sequence[SparseGrad | None] | None = None,
                 padded: bool = False) -> list[torch.Tensor | SparseGrad]:
    """One rank's message, split and checked against this rank's ``segments``: per segment,
    its raw values (``dtype``) if it has fewer than ``min_numel`` elements, else its decoded
    :class:`SparseGrad` (``own[i]`` instead, for this rank's own message: nothing to decode).

    Everything in a received message that does not fit what this rank expects -- the
    framing, a raw entry's length, a payload's numel or dtype -- raises
    :class:`DecodeError` naming the source rank and the segment."""
    entries = unframe(message, len(segments), f"message from rank {source}", padded)
    parts: list[torch.Tensor | SparseGrad] = []
    for i, (seg, entry) in enumerate(zip(segments, entries)):
        if seg.numel < min_numel:
            expected = seg.numel * torch.empty(0, dtype=dtype).element_size()
            if entry.numel() != expected:
                raise DecodeError(f"segment {seg.name!r}: rank {source} sent {entry.numel()} raw bytes, expected {expected}")
            parts.append(from_bytes(entry, dtype))
            continue
        sparse = own[i] if own is not None and own[i] is not None else _decode(entry, seg, source)
        if sparse.numel != seg.numel or sparse.values.dtype != dtype:
            raise DecodeError(
                f"segment {seg.name!r}: rank {source} sent {sparse.numel} {sparse.values.dtype} elements, "
                f"this rank has {seg.numel} {dtype} (do all ranks reduce the same tensors?)"
            )
        parts.append(sparse)
    return parts


def _decode(entry: torch.Tensor, seg: Segment, source: int | str) -> SparseGrad:
    try:
        return decode(entry)
    except DecodeError as exc:
        raise DecodeError(f"segment {seg.name!r}: payload from rank {source}: {exc}") from exc

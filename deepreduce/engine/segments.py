"""The named slices a bucket is compressed in, and how a bucket's large tensors pack
into one payload while each keeps its own top-k budget (``pack_tensors``).

A packed segment covers several tensors (``parts``). Where they do not follow each other
in the buffer (a DDP bucket alternates weights and biases) it also records where each
lies (``spans``): error feedback reads them there, and the receivers add each part's
decoded elements at its own place, so no copy of the bucket is made."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from ..compressor import Compressor
from ..sparse import SparseGrad


@dataclass(frozen=True)
class Segment:
    """A slice ``[offset, offset + numel)`` of a flat buffer (or, with ``spans``, several),
    compressed on its own.

    ``name`` keys the error-feedback memory and the random streams: it must be the same
    on every rank and stable across steps (a parameter's name, a bucket's index).
    ``parts``: the named parts a segment covers, as ``(name, numel)`` in order, when it
    spans several: residuals are then saved and remapped per part. With ``per_part`` each
    part is sparsified on its own budget (per-tensor top-k, one payload); without it the
    segment has one budget (one top-k over a whole bucket). ``spans``: each part's offset
    in the buffer, where the parts do not follow each other (a packed segment gathers
    the large tensors of a bucket in which small ones lie between them); ``offset`` is
    then the first part's, and ``numel`` still the parts' total."""

    name: Hashable
    offset: int
    numel: int
    parts: tuple[tuple[Hashable, int], ...] | None = None
    per_part: bool = False  # each part sparsified on its own budget, in one payload
    spans: tuple[int, ...] | None = None

    def is_small(self, min_numel: int) -> bool:
        """Whether the segment goes the small tensors' way (raw bytes, or the small
        compressor): fewer than ``min_numel`` elements, or a pack of parts that each have
        fewer (the small tensors of a flat group share one payload, whatever its size)."""
        if self.numel < min_numel:
            return True
        return self.parts is not None and not self.per_part and all(numel < min_numel for _, numel in self.parts)

    @property
    def part_numels(self) -> tuple[int, ...] | None:
        """The parts' sizes where each has its own budget (else None: one budget)."""
        return tuple(numel for _, numel in self.parts) if self.per_part and self.parts else None

    def views(self, buffer: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The segment's elements of ``buffer``: one view, or one per part where they lie apart."""
        if self.spans is None:
            return buffer.narrow(0, self.offset, self.numel)
        return [buffer.narrow(0, at, numel) for at, (_, numel) in zip(self.spans, self.parts or ())]

    def write(self, buffer: torch.Tensor, values: torch.Tensor) -> None:
        """Copy the segment's flat ``values`` into its place(s) in ``buffer``."""
        views = self.views(buffer)
        if isinstance(views, torch.Tensor):
            views.copy_(values)
            return
        at = 0
        for view in views:
            view.copy_(values.narrow(0, at, view.numel()))
            at += view.numel()


def pack_segments(segments: list[Segment], compressor: Compressor, min_numel: int) -> list[Segment]:
    """``segments`` with their single tensors at or above ``min_numel`` gathered into
    segments of per-part budgets, in buffer order, across the small and multi-part
    segments between them (those keep their own entries). A run grows as long as the
    compressor can carry it part by part with receivers decoding what per-tensor payloads
    give (``Compressor.packs_parts``); a tensor that cannot join starts the next. Each
    packed segment takes the message slot of its first tensor. Decided from sizes and
    the compressor's density alone, so every rank packs alike."""
    out: list[Segment | None] = []
    run: list[Segment] = []
    slot = 0

    def close() -> None:
        if len(run) > 1:
            parts = tuple((s.name, s.numel) for s in run)
            adjacent = all(a.offset + a.numel == b.offset for a, b in zip(run, run[1:]))
            out[slot] = Segment(tuple(name for name, _ in parts), run[0].offset, sum(s.numel for s in run),
                                parts=parts, per_part=True, spans=None if adjacent else tuple(s.offset for s in run))
        elif run:
            out[slot] = run[0]
        run.clear()

    for seg in segments:
        if seg.parts is not None or seg.is_small(min_numel):
            out.append(seg)
            continue
        if run and not compressor.packs_parts([s.numel for s in run] + [seg.numel]):
            close()
        if not run:
            slot = len(out)
            out.append(None)
        run.append(seg)
    close()
    return [seg for seg in out if seg is not None]


def part_shifts(seg: Segment, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a segment with ``spans``: each part's first index in the segment but the first
    (where runs of indices split), and what each part's indices add to reach the buffer."""
    numels = torch.tensor([numel for _, numel in seg.parts or ()], dtype=torch.int64)
    starts = torch.cumsum(numels, 0) - numels
    return starts[1:].to(device), (torch.tensor(seg.spans, dtype=torch.int64) - starts).to(device)


def placed(sparse: SparseGrad, shifts: tuple[torch.Tensor, torch.Tensor], numel: int) -> SparseGrad:
    """A gathered segment's decoded elements at their parts' positions in a buffer of
    ``numel`` elements (``shifts``: :func:`part_shifts`)."""
    bounds, offsets = shifts
    # Indices ascend, so each part's elements are one run of them.
    counts = torch.diff(torch.searchsorted(sparse.indices, bounds), prepend=bounds.new_zeros(1),
                        append=bounds.new_full((1,), sparse.k))
    return SparseGrad(sparse.indices + offsets.repeat_interleave(counts, output_size=sparse.k), sparse.values, numel)


def takes_parts(compressor: Compressor) -> bool:
    """Whether ``compressor.compress_detailed`` takes ``parts=`` (a user's wrapper may not)."""
    method = compressor.__dict__.get("compress_detailed") or type(compressor).compress_detailed
    return _accepts_parts(method)


@functools.lru_cache(maxsize=64)
def _accepts_parts(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "parts" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

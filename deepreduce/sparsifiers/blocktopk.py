"""``blocktopk``: the top blocks of ``block`` consecutive elements, every element of each.

The flat tensor is cut into aligned blocks ``[b*block, (b+1)*block)`` (the last one
shorter when ``block`` does not divide the size). Each block is scored by the mean of
its elements' magnitudes (``norm=l1``, the default) or of their squares (``norm=l2``:
the ranking of the blocks' L2 norms); means, so the shorter last block competes on
equal terms. The ``round(k / block)`` best blocks are kept (at least one); ties go to
the lower block. With 1-bit values (``uniform:bits=1``: sign times a mean magnitude)
``l1`` learned better in update mode (benchmarks/RESULTS.md): it prefers blocks whose
elements are all large, where a sign code loses least, over blocks with one spike.

Where the index set's positions are spread evenly -- an optimizer's update, where every
element moves by about the learning rate -- per-element top-k spends most of its bits
on positions. Whole blocks cost a few bits per *block* (the ``blocks`` index codec
writes block ids, not positions), so at the same bytes several times more elements
travel, with few-bit values (``uniform``).

For raw gradients (the DDP hook) prefer ``topk``: error feedback lets one large entry in
a block of small ones wait in the residual, growing, until its block's mean ranks; with
SGD this destabilised training where ``topk`` at the same bytes did not (RESULTS.md,
shared-index section).

The number of kept elements is known in advance: ``kept * block``, or ``block`` minus
the last block's length fewer when the last (shorter) block is among them. Both counts
are declared, so payload sizes can still be computed ahead (the larger one bounds them).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .._bits import host_array
from ..codecs.index.blocks import expand_blocks
from ..options import Option
from . import SelectContext, register_sparsifier

MAX_BLOCK = (1 << 31) - 1


def kept_blocks(numel: int, k: int, block: int) -> int:
    """Blocks kept for a target of ``k`` of ``numel`` elements: ``round(k / block)``, at
    least one (for ``k > 0``), at most all of them."""
    if k <= 0 or numel <= 0:
        return 0
    nblocks = -(-numel // block)
    return min(nblocks, max(1, (2 * k + block) // (2 * block)))


def block_counts(numel: int, k: int, config: Mapping[str, Any]) -> tuple[int, ...]:
    """The element counts :func:`blocktopk` can return for a target ``k``."""
    block = config["block"]
    kept = kept_blocks(numel, k, block)
    nblocks = -(-numel // block)
    if kept == 0:
        return (0,)
    if kept == nblocks:
        return (numel,)
    last = numel - (nblocks - 1) * block
    return (kept * block,) if last == block else (kept * block - (block - last), kept * block)


def block_scores(magnitude: torch.Tensor, block: int, norm: str) -> torch.Tensor:
    """Per block the mean of ``|x|^2`` (``l2``) or ``|x|`` (``l1``), in float32 at least."""
    wide = magnitude if magnitude.dtype in (torch.float32, torch.float64) else magnitude.float()
    values = wide.square() if norm == "l2" else wide
    numel = values.numel()
    full = numel // block
    scores = values[: full * block].reshape(full, block).sum(dim=1) / block
    if full * block < numel:
        tail = values[full * block :]
        scores = torch.cat([scores, (tail.sum() / tail.numel()).reshape(1)])
    return scores


def aligned_parts(part_numels: Sequence[int], config: Mapping[str, Any]) -> bool:
    """Parts (tensors laid end to end) whose blocks are blocks of the whole: every part but
    the last a whole number of blocks."""
    return all(numel % config["block"] == 0 for numel in part_numels[:-1])


def blocktopk_parts(magnitude: torch.Tensor, part_numels: Sequence[int], ks: Sequence[int], ctx: SelectContext,
                    block: int = 64, norm: str = "l1") -> torch.Tensor:
    """:func:`blocktopk` of each part at its own ``k``, at once: the blocks of aligned parts
    are the whole's, so one score pass and one sort rank them all; a second, stable sort
    by part keeps each part's descending order and its ties (lower block first)."""
    device = magnitude.device
    scores = block_scores(magnitude, block, norm)
    part_blocks = [-(-numel // block) for numel in part_numels]
    kept = [kept_blocks(numel, k, block) for numel, k in zip(part_numels, ks)]
    array = _finite_host(scores)
    if array is not None:
        # As below: descending score, then a stable sort by part (small ints: a radix sort).
        part_of = np.repeat(np.arange(len(part_blocks), dtype=np.min_scalar_type(len(part_blocks))), part_blocks)
        order = np.argsort(-array, kind="stable")
        order = order[np.argsort(part_of[order], kind="stable")]
        starts_of = np.cumsum([0, *part_blocks])[part_of]
        chosen = np.sort(order[np.arange(order.size) - starts_of < np.asarray(kept)[part_of]])
        return expand_blocks(torch.from_numpy(chosen), block, magnitude.numel())
    starts = torch.tensor([0, *part_blocks], device=device).cumsum(0)
    order = torch.sort(scores, descending=True, stable=True).indices
    part = torch.bucketize(order, starts[1:], right=True)
    by_part = torch.sort(part, stable=True)
    order, part = order.index_select(0, by_part.indices), by_part.values
    rank = torch.arange(order.numel(), device=device) - starts.index_select(0, part)
    chosen = order[rank < torch.tensor(kept, device=device).index_select(0, part)]
    return expand_blocks(torch.sort(chosen).values, block, magnitude.numel())


@register_sparsifier(
    "blocktopk",
    "the round(k/block) aligned blocks of `block` elements with the largest mean |x| (or |x|^2), whole; "
    "use the blocks index codec",
    options=(
        Option("block", int, 64, "elements per block", check=lambda v: 1 <= v <= MAX_BLOCK,
               check_text=f"must be in [1, {MAX_BLOCK}]"),
        Option("norm", str, "l1", "block score: mean of magnitudes (l1) or of squares (l2)", choices=("l1", "l2")),
    ),
    counts=block_counts,
    per_part=aligned_parts,
    select_parts=blocktopk_parts,
)
def blocktopk(magnitude: torch.Tensor, k: int, ctx: SelectContext, block: int = 64, norm: str = "l1") -> torch.Tensor:
    numel = magnitude.numel()
    kept = kept_blocks(numel, k, block)
    scores = block_scores(magnitude, block, norm)
    if kept >= scores.numel():
        return torch.arange(numel, device=magnitude.device)
    # A stable sort breaks ties towards the lower block, the same on every device
    # (NaN scores sort first: a non-finite block is always sent).
    array = _finite_host(scores)
    if array is not None:
        chosen = torch.from_numpy(np.sort(np.argsort(-array, kind="stable")[:kept]))
    else:
        chosen = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:kept]).values
    return expand_blocks(chosen, block, numel)


def _finite_host(scores: torch.Tensor) -> np.ndarray | None:
    """``scores`` as a numpy array where numpy ranks them as torch's stable descending sort
    does (on the CPU, all finite), else None. numpy's stable sorts of a few thousand
    scores are several times faster than torch's on one thread."""
    array = host_array(scores)
    return array if array is not None and bool(np.isfinite(array).all()) else None

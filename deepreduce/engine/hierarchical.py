"""Hierarchical communication (HiTopKComm): dense inside a node, compressed between nodes.

``Engine(..., scheme="hierarchical")`` groups the ranks by node, ``L`` processes per node
(torchrun's ``LOCAL_WORLD_SIZE``, or ``node_size``); rank ``n * L + j`` is local rank ``j``
of node ``n``, as torchrun numbers them. Per compressed bucket, on every rank::

    cut into L slots of s = ceil(numel / L)                 the last slot zero-padded
    dense reduce-scatter inside the node                    local rank j owns slot j, summed over its
                                                            node (fp32 for fp16/bf16), divided by L
    the engine's compressed path on slot j, across the      error feedback on the slot, top-k of 1/L of the
        N ranks with local rank j (one per node)            bucket, size exchange, dense fallback, one
                                                            all-gather, decode and sum in node order, / N
    dense all-gather inside the node                        every rank holds the whole averaged bucket

Only the compressed exchange crosses nodes, and each node sends L slots of 1/L of the
bucket, so the inter-node bytes per rank and the top-k work per rank both drop by L
compared with the flat all-gather (``scheme="allgather"``), while the fast intra-node
links carry the dense reduce-scatter and all-gather.

Invariants, as for the flat scheme:

- Bitwise-identical averages: slot j is averaged by the N ranks of local rank j, which
  decode the same N payloads in node order (each sum divided by N first, after the
  node sums were divided by L), then copied unchanged to the node's other ranks.
- Dense fallback: decided per slot from the sizes its N ranks exchanged (the same on
  all of them): ``N * message > 2 * slot bytes`` -> the slot is allreduced across nodes.
- Non-finite gradients: a NaN or Inf in any rank's bucket shows in the sum of the slot
  that holds it; a one-element allreduce tells the node's other ranks, and each size
  exchange across nodes tells the other nodes; the whole world then takes the engine's
  non-finite path (dense, no error feedback kept, or :class:`~deepreduce.NonFiniteError`
  on every rank), never half of it.
- Failures: a rank whose exchange failed still joins a one-element allreduce of its
  node before raising, so the other ranks of its node raise too instead of waiting for it.

Segments (parameters) are cut at slot boundaries. A segment wholly inside a slot keeps
its name, so its residual is keyed as with the flat scheme; a piece of a segment that
crosses a boundary is named ``"<name>[<start>:<stop>]"`` (element range inside the
segment). With ``granularity="tensor"`` each piece gets its own top-k; with ``"bucket"``
one top-k runs over the slot, its residual saved per piece. ``state_dict`` therefore
restores every residual when a run resumes with the same node size and bucket layout;
a changed layout restarts the residuals of the pieces whose ranges changed from zero.

``scheme="hierarchical_shared_index"`` runs the shared-index allreduce
(:mod:`deepreduce.engine.shared_index`) between nodes instead of the all-gather: per slot
and step one node's rank of that local rank picks the indices, and the N ranks allreduce
their values there. The bytes a rank sends between nodes then no longer grow with the
number of nodes (about one index message plus twice k values), at the shared index's cost
in accuracy (one rank's choice of indices per slot and step); value codecs ``raw``,
``fp16``, ``bf16`` and lossless index codecs only.

Tuning:

- Worth it when a node's ranks share fast links (NVLink, PCIe, loopback) and the nodes a
  slow one: the slow link carries ``1/L`` of the flat scheme's bytes. With one process
  per node it only adds two no-op collectives: use ``"allgather"`` there.
- The exchange across nodes completes inside the hook (the intra-node all-gather that
  follows cannot be issued from a future's callback), so a bucket's inter-node time is
  not overlapped with the rest of the backward pass; bigger buckets amortise it better.
- Each slot's payload travels to ``N - 1`` peers, so the density at which the dense
  fallback takes over rises with ``L``: at ``N`` nodes it is about ``2 / (N * bits per
  kept element / 32)`` of the elements.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch

from ..comm import Transport
from ..errors import ConfigError, DeepReduceError, NonFiniteError
from .memory import memory_dtype
from .messages import all_finite
from .nodes import NodeGroups, check_layout, check_node_transport, resolve_node_size
from .segments import Segment
from .shared_index import check_compressor, reduce_shared_index

if TYPE_CHECKING:
    from .pipeline import Engine

SCHEME = "hierarchical"


def shard_segments(segments: Sequence["Segment"], start: int, numel: int, granularity: str) -> list["Segment"]:
    """The pieces of ``segments`` (offsets in the bucket) inside ``[start, start + numel)``,
    as segments of that shard (offsets from ``start``); see the module docstring for
    their names. ``granularity="bucket"`` makes one segment with the pieces as parts."""
    end = start + numel
    pieces = []
    for seg in segments:
        atoms = [(seg.name, seg.numel)] if seg.parts is None else seg.parts
        offset = seg.offset
        for name, size in atoms:
            lo, hi = max(offset, start), min(offset + size, end)
            if hi > lo:
                piece = name if (lo, hi) == (offset, offset + size) else f"{name}[{lo - offset}:{hi - offset}]"
                pieces.append(Segment(piece, lo - start, hi - lo))
            offset += size
    if granularity == "bucket" and len(pieces) > 1:
        return [Segment(tuple(p.name for p in pieces), 0, numel, parts=tuple((p.name, p.numel) for p in pieces))]
    return pieces


def hierarchical_scheme(engine: "Engine") -> "HierarchicalScheme":
    """The hierarchical reducer for ``engine`` (the engine's scheme factory): the
    all-gather of every rank's payload between nodes."""
    return _scheme_for(engine, "hierarchical", "allgather")


def hierarchical_shared_index_scheme(engine: "Engine") -> "HierarchicalScheme":
    """The ``"hierarchical_shared_index"`` reducer: between nodes, the shared-index
    allreduce (:mod:`deepreduce.engine.shared_index`) instead of the all-gather, so the
    bytes a rank sends between nodes stop growing with the number of nodes."""
    _check_transport(engine, "hierarchical_shared_index")
    check_compressor(engine.compressor)
    if engine.small_compressor is not None:
        raise ConfigError("scheme 'hierarchical_shared_index' sums the tensors below min_numel densely; "
                          "small_compressor applies to schemes 'allgather' and 'hierarchical'")
    return _scheme_for(engine, "hierarchical_shared_index", "shared_index")


def _check_transport(engine: "Engine", name: str) -> None:
    if engine._transport is not None:  # else a transport made on first use: NodeGroups checks it
        check_node_transport(name, engine._transport)


def _scheme_for(engine: "Engine", name: str, between_nodes: str) -> "HierarchicalScheme":
    _check_transport(engine, name)
    scheme = HierarchicalScheme(engine.node_size, between_nodes=between_nodes)
    scheme.engine = engine
    return scheme


class HierarchicalScheme:
    """The engine's ``scheme="hierarchical"`` (see the module docstring): called as the
    engine's compressed-bucket reducer, ``scheme(buffer, segments, dense_bytes, key)``.
    The sub-groups are made once, at the configuration check (or the first bucket
    without one). ``engine``: the engine it serves (set by :func:`hierarchical_scheme`)."""

    def __init__(self, node_size: int | None = None, between_nodes: str = "allgather") -> None:
        if between_nodes not in ("allgather", "shared_index"):
            raise ConfigError(f"between_nodes must be 'allgather' or 'shared_index', got {between_nodes!r}")
        self.between_nodes = between_nodes
        self.from_env = node_size is None
        self.node_size = resolve_node_size(node_size)
        self.groups: NodeGroups | None = None
        self.engine: "Engine | None" = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "groups": None}  # process groups belong to one process

    def describe(self) -> dict[str, Any]:
        return {"node_size": self.node_size, "between_nodes": self.between_nodes}

    def setup(self, world: Transport) -> None:
        if self.groups is None:
            if self.from_env:
                check_layout(world.rank, self.node_size)
            self.groups = NodeGroups(world, self.node_size)

    def __call__(self, buffer: torch.Tensor, segments: list["Segment"], dense_bytes: int,
                 key: Hashable) -> torch.futures.Future:
        return self.reduce(self.engine, buffer, segments, key)

    def reduce(self, engine: "Engine", buffer: torch.Tensor, segments: list["Segment"], key: Hashable) -> torch.futures.Future:
        """Average ``buffer`` (a compressed bucket) over all ranks; the collectives inside the
        node and across nodes are issued before returning, the final all-gather asynchronously."""

        self.setup(engine.transport)
        groups = self.groups
        L, numel, step = groups.node_size, buffer.numel(), engine.step
        width = -(-numel // L)
        if engine.clip_norm is not None:
            engine._clip(buffer)
        padded = buffer if numel == L * width else torch.nn.functional.pad(buffer, (0, L * width - numel))
        received = groups.scatter_slots(padded.view(L, width))
        # The node's sum of this rank's slot, in local-rank order (one rank makes it: any
        # fixed order keeps every rank's result identical); fp16/bf16 are summed in fp32.
        total = received.sum(0, dtype=memory_dtype(buffer.dtype))
        if engine.average:
            total.div_(L)
        shard = total.to(buffer.dtype)
        start = groups.local_rank * width
        real = max(0, min(width, numel - start))
        view = shard.narrow(0, 0, real)
        pieces = shard_segments(segments, start, real, engine.granularity)
        shard_bytes = real * buffer.element_size()
        # NaN/Inf anywhere in the bucket of any rank of the node shows in some slot's sum;
        # every rank of the node learns it here, every node through the size exchange.
        node_nonfinite = groups.node_sum(0.0 if all_finite(shard) else 1.0, buffer.device) > 0
        sent_before = engine._stats.get("sent_bytes")
        error: BaseException | None = None
        try:
            # A non-finite node takes the engine's non-finite path on every slot, whichever
            # protocol (computed sizes or exchanged) the slot's exchange uses.
            exchange = engine._compressed if self.between_nodes == "allgather" else functools.partial(reduce_shared_index, engine)
            exchanged = exchange(view, pieces, shard_bytes, key, groups.cross, finite=not node_nonfinite)
            exchanged.wait()
        except NonFiniteError as exc:
            # the engine names the rank in the cross-node group, which is the node
            error = NonFiniteError(str(exc).replace("the gradient of rank", "the gradient of a rank on node"))
        except Exception as exc:
            error = exc
        engine._stats.add(inter_node_bytes=engine._stats.get("sent_bytes") - sent_before,
                          intra_node_bytes=(L + 1) * width * buffer.element_size())
        failed = groups.node_sum(0.0 if error is None else 1.0, buffer.device)
        if error is not None:
            raise error
        if failed:  # the node's other ranks raised; without their slots there is no average
            raise DeepReduceError(f"deepreduce: bucket {key!r} at step {step}: {failed} other rank(s) of this node "
                                  "failed to reduce their slot (see their errors)")
        out = buffer if padded is buffer else torch.empty_like(padded)
        try:
            gathered = groups.allgather_into_async(out, shard)
        except Exception as exc:
            raise engine._failed("the intra-node all-gather", key, step, exc) from exc
        if out is buffer:
            return gathered

        def unpad(done: torch.futures.Future) -> torch.Tensor:
            buffer.copy_(done.value()[:numel])
            return buffer

        return gathered.then(unpad)

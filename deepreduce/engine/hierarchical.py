"""Hierarchical communication (HiTopKComm): dense inside a node, compressed between nodes.

``Engine(..., scheme="hierarchical")`` groups the ranks by node, ``L`` processes per node
(torchrun's ``LOCAL_WORLD_SIZE``, or ``node_size``); rank ``n * L + j`` is local rank ``j``
of node ``n``, as torchrun numbers them. Per compressed bucket, on every rank::

    divide by L, cut into L slots of s = ceil(numel / L)    the last slot zero-padded; one more
                                                            element per slot: "a rank of mine is not finite"
    dense reduce-scatter inside the node                    local rank j owns slot j, summed over its node
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
- Non-finite gradients: every rank writes its own finiteness into every slot's extra
  element, so after the reduce-scatter each slot owner knows whether any rank of its
  node is not finite, and each size exchange across nodes tells all of them; the whole
  world then takes the engine's non-finite path (dense, no error feedback kept, or
  :class:`~deepreduce.NonFiniteError` on every rank), never half of it.
- Failures: a rank whose exchange failed still joins its node's all-gather, flagging
  the failure, so the other ranks of its node raise too instead of waiting for it.

Segments (parameters) are cut at slot boundaries. A segment wholly inside a slot keeps
its name, so its residual is keyed as with the flat scheme; a piece of a segment that
crosses a boundary is named ``"<name>[<start>:<stop>]"`` (element range inside the
segment). With ``granularity="tensor"`` each piece gets its own top-k; with ``"bucket"``
one top-k runs over the slot, its residual saved per piece. ``state_dict`` therefore
restores every residual when a run resumes with the same node size and bucket layout;
a changed layout restarts the residuals of the pieces whose ranges changed from zero.

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

import os
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch
import torch.distributed as dist

from ..comm import Transport
from ..errors import ConfigError, DeepReduceError, NonFiniteError

if TYPE_CHECKING:
    from .pipeline import Engine, Segment

SCHEME = "hierarchical"
# torch 2.13 renamed reduce_scatter_tensor; use whichever this torch has.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def resolve_node_size(node_size: int | None) -> int:
    """``node_size``, or torchrun's ``LOCAL_WORLD_SIZE`` when it is None; ConfigError if
    neither gives a positive int."""
    if node_size is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            raise ConfigError("scheme='hierarchical' needs the processes per node: pass node_size=L, or launch with "
                              "torchrun (which sets LOCAL_WORLD_SIZE)")
        try:
            node_size = int(env)
        except ValueError:
            raise ConfigError(f"LOCAL_WORLD_SIZE={env!r} is not an int; pass node_size=L") from None
    if isinstance(node_size, bool) or not isinstance(node_size, int) or node_size < 1:
        raise ConfigError(f"node_size must be a positive int, got {node_size!r}")
    return node_size


def shard_segments(segments: Sequence["Segment"], start: int, numel: int, granularity: str) -> list["Segment"]:
    """The pieces of ``segments`` (offsets in the bucket) inside ``[start, start + numel)``,
    as segments of that shard (offsets from ``start``); see the module docstring for
    their names. ``granularity="bucket"`` makes one segment with the pieces as parts."""
    from .pipeline import Segment

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


class NodeGroups:
    """The two sub-groups of one rank: its node (dense collectives) and the ranks with its
    local rank on the other nodes (the compressed exchange).

    Every rank creates every group, in the same order (``dist.new_group`` is collective
    over the default group): first the N node groups, then the L cross-node groups."""

    def __init__(self, world: Transport, node_size: int) -> None:
        from ..comm.torch_dist import TorchTransport

        if not isinstance(world, TorchTransport):
            raise ConfigError(f"scheme='hierarchical' runs over torch.distributed sub-groups; the transport is a "
                              f"{type(world).__name__} (use the DDP hook or a TorchTransport)")
        size, rank, L = world.world_size, world.rank, node_size
        if dist.get_world_size() != size:
            raise ConfigError("scheme='hierarchical' needs the default process group (process_group=None): its "
                              "sub-groups are made by every rank of the default group")
        if size % L:
            raise ConfigError(f"scheme='hierarchical': the world of {size} ranks is not a whole number of nodes of "
                              f"node_size={L} processes")
        self.node_size, self.nodes = L, size // L
        self.node_rank, self.local_rank = divmod(rank, L)
        ranks = dist.get_process_group_ranks(world.group)
        node_groups = [dist.new_group(ranks[n * L:(n + 1) * L]) for n in range(self.nodes)]
        cross_groups = [dist.new_group(ranks[j::L]) for j in range(L)]
        self.node = TorchTransport(node_groups[self.node_rank], device=world.device)
        self.cross = TorchTransport(cross_groups[self.local_rank], device=world.device)

    def reduce_scatter(self, slots: torch.Tensor, slot: int) -> torch.Tensor:
        """This rank's ``slot`` elements of ``slots`` (L * slot), summed over the node. Blocking."""
        where = self.node._gather_device(slots.device)
        out = torch.empty(slot, dtype=slots.dtype, device=where)
        _reduce_scatter_single(out, slots.to(where), group=self.node.group)
        return out.to(slots.device)

    def allgather_async(self, shard: torch.Tensor) -> torch.futures.Future:
        """Every local rank's ``shard`` (equal sizes), concatenated in local-rank order."""
        from ..comm.torch_dist import _all_gather_single

        where = self.node._gather_device(shard.device)
        out = torch.empty(self.node_size * shard.numel(), dtype=shard.dtype, device=where)
        work = _all_gather_single(out, shard.to(where), group=self.node.group, async_op=True)
        return work.get_future().then(lambda _: out.to(shard.device))


def _check_layout(rank: int, node_size: int) -> None:
    """With the node size from torchrun's environment, ranks must be numbered node by node."""
    group, local = os.environ.get("GROUP_RANK"), os.environ.get("LOCAL_RANK")
    if group is None or local is None:
        return
    if divmod(rank, node_size) != (int(group), int(local)):
        raise ConfigError(f"scheme='hierarchical': rank {rank} is local rank {local} of node {group}, but the scheme "
                          f"needs rank = node * {node_size} + local rank (same processes on every node)")


class HierarchicalScheme:
    """The engine's ``scheme="hierarchical"`` (see the module docstring). The sub-groups
    are made once, at the configuration check (or the first bucket without one)."""

    def __init__(self, node_size: int | None = None) -> None:
        self.from_env = node_size is None
        self.node_size = resolve_node_size(node_size)
        self.groups: NodeGroups | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "groups": None}  # process groups belong to one process

    def describe(self) -> dict[str, Any]:
        return {"node_size": self.node_size}

    def setup(self, world: Transport) -> None:
        if self.groups is None:
            if self.from_env:
                _check_layout(world.rank, self.node_size)
            self.groups = NodeGroups(world, self.node_size)

    def reduce(self, engine: "Engine", buffer: torch.Tensor, segments: list["Segment"], key: Hashable) -> torch.futures.Future:
        """Average ``buffer`` (a compressed bucket) over all ranks; the collectives inside the
        node and across nodes are issued before returning, the final all-gather asynchronously."""
        from .pipeline import _NONFINITE

        self.setup(engine.transport)
        groups = self.groups
        L, numel, step = groups.node_size, buffer.numel(), engine.step
        width = -(-numel // L)
        slot = width + 1  # + the finiteness flag, later the status
        if engine.clip_norm is not None:
            engine._clip(buffer)
        slots = buffer.new_zeros(L, slot)
        for j in range(L):
            lo, n = j * width, max(0, min(width, numel - j * width))
            if n:
                # Divided before the sum, as allreduce does: fp16 node sums stay in range.
                torch.div(buffer.narrow(0, lo, n), L if engine.average else 1, out=slots[j, :n])
        slots[:, width] = 0.0 if bool(torch.isfinite(buffer).all()) else 1.0
        shard = groups.reduce_scatter(slots.view(-1), slot)
        start = groups.local_rank * width
        real = max(0, min(width, numel - start))
        view = shard.narrow(0, 0, real)
        pieces = shard_segments(segments, start, real, engine.granularity)
        shard_bytes = real * buffer.element_size()
        sent_before = engine._stats.get("sent_bytes")
        error: BaseException | None = None
        try:
            if bool(shard[width] > 0):  # some rank of this node is not finite: tell the other nodes
                sizes = engine._allgather_sizes(_NONFINITE, key, groups.cross)
                exchanged = engine._nonfinite(view, pieces, [], sizes, key, shard_bytes, groups.cross)
            else:
                exchanged = engine._compressed(view, pieces, shard_bytes, key, groups.cross)
            exchanged.wait()
        except NonFiniteError as exc:
            # the engine names the rank in the cross-node group, which is the node
            error = NonFiniteError(str(exc).replace("the gradient of rank", "the gradient of a rank on node"))
        except Exception as exc:
            error = exc
        engine._stats.add(inter_node_bytes=engine._stats.get("sent_bytes") - sent_before,
                          intra_node_bytes=(slots.numel() + slot) * buffer.element_size())
        shard[width] = 0.0 if error is None else 1.0
        if error is not None:
            shard[:width].zero_()
            groups.allgather_async(shard).wait()  # the node's other ranks learn it and raise too
            raise error

        def assemble(done: torch.futures.Future) -> torch.Tensor:
            gathered = done.value().view(L, slot)
            failed = (gathered[:, width] != 0).nonzero().flatten().tolist()
            if failed:
                raise DeepReduceError(f"deepreduce: bucket {key!r} at step {step}: local rank "
                                      f"{', '.join(map(str, failed))} of this node failed to reduce its slot (see its error)")
            for j in range(L):
                lo, n = j * width, max(0, min(width, numel - j * width))
                if n:
                    buffer.narrow(0, lo, n).copy_(gathered[j, :n])
            return buffer

        try:
            gathered = groups.allgather_async(shard)
        except Exception as exc:
            raise engine._failed("the intra-node all-gather", key, step, exc) from exc
        return gathered.then(assemble)

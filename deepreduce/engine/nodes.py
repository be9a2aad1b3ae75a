"""Ranks grouped by node: how many processes a node has (given, or torchrun's
``LOCAL_WORLD_SIZE``), the check that ranks are numbered node by node, and
:class:`NodeGroups`, the two torch.distributed sub-groups of one rank (its node, and the
ranks with its local rank on the other nodes) that the hierarchical schemes and the
shared index's per-node relay run over."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..comm import Transport
from ..comm.torch_dist import TorchTransport, after
from ..errors import ConfigError


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


def check_layout(rank: int, node_size: int) -> None:
    """With the node size from torchrun's environment, ranks must be numbered node by node."""
    group, local = os.environ.get("GROUP_RANK"), os.environ.get("LOCAL_RANK")
    if group is None or local is None:
        return
    if divmod(rank, node_size) != (int(group), int(local)):
        raise ConfigError(f"scheme='hierarchical': rank {rank} is local rank {local} of node {group}, but the scheme "
                          f"needs rank = node * {node_size} + local rank (same processes on every node)")


def check_node_transport(scheme: str, transport: Transport) -> None:
    """ConfigError unless ``transport`` is torch.distributed's, whose sub-groups the node
    schemes are made of."""
    if not isinstance(transport, TorchTransport):
        raise ConfigError(f"scheme={scheme!r} runs over torch.distributed sub-groups (one per node, one across nodes); "
                          f"the transport is a {type(transport).__name__}: use scheme 'allgather' or 'shared_index' "
                          "with it, or the DDP hook")


class NodeGroups:
    """The two sub-groups of one rank: its node (dense collectives) and the ranks with its
    local rank on the other nodes (the compressed exchange).

    Every rank creates every group, in the same order (``dist.new_group`` is collective
    over the default group): first the N node groups, then the L cross-node groups."""

    def __init__(self, world: Transport, node_size: int) -> None:
        check_node_transport("hierarchical", world)
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

    def scatter_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Every local rank's row ``j`` of ``slots`` (L x width) for this rank's ``j``: an
        (L, width) tensor whose row ``i`` came from local rank ``i``. Blocking.

        A pairwise exchange (``all_to_all_single``) and a local sum make the reduce-scatter:
        on gloo it moves the same bytes several times faster than ``reduce_scatter``."""
        where = self.node._gather_device(slots.device)
        received = torch.empty_like(slots, device=where)
        dist.all_to_all_single(received, slots.to(where), group=self.node.group)
        return received.to(slots.device)

    def node_sum(self, count: float, device: torch.device) -> int:
        """``count`` summed over the node's ranks (a one-element allreduce). Blocking."""
        tensor = torch.tensor([count], dtype=torch.float64, device=self.node._gather_device(device))
        dist.all_reduce(tensor, group=self.node.group)
        return int(tensor.item())

    def allgather_into_async(self, out: torch.Tensor, shard: torch.Tensor) -> torch.futures.Future:
        """Every local rank's ``shard`` written into the rows of ``out`` (L x shard, a view
        of the bucket where it can be), in local-rank order."""
        where = self.node._gather_device(shard.device)
        target = out if out.device == where else torch.empty_like(out, device=where)
        rows = list(target.view(self.node_size, -1).unbind(0))
        work = dist.all_gather(rows, shard.to(where), group=self.node.group, async_op=True)

        def landed() -> torch.Tensor:
            if target is not out:
                out.copy_(target)
            return out

        return after(work, landed)

"""``TorchTransport``: torch.distributed (gloo on CPU, NCCL on CUDA), same code for both.

Variable-length all-gather, the way that works on every backend (gloo's list-form
``all_gather`` rejects unequal sizes): with the sizes known, pad every payload to the
largest (rounded up to 8 bytes so decoded parts stay aligned), one flat
``all_gather_single`` (``all_gather_into_tensor`` before torch 2.13), slice.

gloo all-gathers host memory only (CUDA tensors abort the process), so on a gloo group
CUDA payloads travel through host copies and come back on their device; NCCL gathers
on the group's GPU.

:meth:`allgather_async` and :meth:`allreduce_async` only *issue* a collective. In a DDP
comm hook they must be called from the hook body, never from a ``Future.then``
callback: callbacks run on the backend's threads, where issuing a collective breaks the
fixed order gloo needs.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import Transport, check_payload, completed
from ..wire import pad8

# torch 2.13 renamed all_gather_into_tensor; use whichever this torch has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchTransport(Transport):
    """Collectives over one ``torch.distributed`` process group.

    Args:
        process_group: the group (None: the default group).
        device: where small control messages (sizes, config fingerprints) live; by
            default the current CUDA device for NCCL groups and the CPU otherwise.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, device: torch.device | str | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchTransport needs an initialized torch.distributed process group (dist.init_process_group)")
        self.group = process_group if process_group is not None else dist.group.WORLD
        backend = str(dist.get_backend(self.group)).lower()
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.device = torch.device(device)
        self._host_gather = "gloo" in backend
        self._rank = dist.get_rank(self.group)
        self._world_size = dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _gather_device(self, device: torch.device) -> torch.device:
        """Where a collective on tensors of ``device`` runs: the host on gloo, the
        group's GPU on NCCL."""
        if self._host_gather:
            return torch.device("cpu")
        return device if device.type == self.device.type else self.device

    def allgather_sizes(self, nbytes: int) -> list[int]:
        device = self._gather_device(self.device)
        mine = torch.tensor([nbytes], dtype=torch.int64, device=device)
        everyone = torch.empty(self._world_size, dtype=torch.int64, device=device)
        _all_gather_single(everyone, mine, group=self.group)
        return everyone.tolist()

    def allgather_async(self, payload: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        payload = self._check_sizes(payload, sizes)
        width = pad8(max(sizes))
        where = self._gather_device(payload.device)
        padded = torch.nn.functional.pad(payload, (0, width - payload.numel())).to(where)
        gathered = torch.empty(self._world_size * width, dtype=torch.uint8, device=where)
        work = _all_gather_single(gathered, padded, group=self.group, async_op=True)

        def split() -> list[torch.Tensor]:
            on_device = gathered.to(payload.device)
            return [on_device[r * width : r * width + n] for r, n in enumerate(sizes)]

        return after(work, split)

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        where = self._gather_device(tensor.device)
        if where == tensor.device and tensor.is_contiguous():
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
            return after(work, lambda: tensor)
        # gloo sums host memory only, and a strided view would be summed wrongly: stage a
        # contiguous copy and write the sum back.
        staged = tensor.to(where).contiguous()
        work = dist.all_reduce(staged, group=self.group, async_op=True)

        def copy_back() -> torch.Tensor:
            with torch.no_grad():
                tensor.copy_(staged)
            return tensor

        return after(work, copy_back)

    def broadcast_async(self, payload: torch.Tensor, root: int) -> torch.futures.Future:
        payload = check_payload(payload)
        self._check_root(root)
        if payload.numel() == 0:  # every rank knows the length: all skip alike
            return completed(payload)
        # gloo broadcasts host memory only: stage through the host, as the gather does.
        staged = payload.to(self._gather_device(payload.device)).contiguous()
        work = dist.broadcast(staged, src=dist.get_global_rank(self.group, root), group=self.group, async_op=True)
        return after(work, lambda: staged.to(payload.device))

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def after(work: dist.Work, result: Callable[[], Any]) -> torch.futures.Future:
    """The future of ``work`` continued by ``result()`` once the collective succeeded.
    A ``then`` callback runs when the collective fails too: one that ignored its
    argument would hand on the untouched (even uninitialised) buffers as if the
    collective had succeeded, so the error is raised here first."""

    def run(done: torch.futures.Future) -> Any:
        done.value()  # raises the collective's error
        return result()

    return work.get_future().then(run)


def close_process_group(completed: bool = True) -> None:
    """Tear down the default process group; after a completed run, wait for every rank first.

    Rank 0 hosts the rendezvous store: if it leaves while another rank is still busy
    (evaluating, writing a checkpoint), that rank's gloo threads lose their peer during
    its own teardown and the process aborts ("terminate called without an active
    exception"). After a failure the barrier is skipped: the other ranks may never come.
    Unreachable DDP models and their pending work are collected first, while the group
    still exists."""
    if not dist.is_initialized():
        return
    gc.collect()
    if completed:
        dist.barrier()
    dist.destroy_process_group()

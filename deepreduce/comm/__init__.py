"""Transports: how payloads travel between ranks.

:class:`Transport` holds every collective the per-step engine needs; torch.distributed,
Horovod and mpi4py each implement it, so the same compressor produces the same payloads
and the same averages whatever carries them. Payloads have different lengths on
different ranks: the engine first all-gathers the sizes (:meth:`Transport.allgather_sizes`),
decides (compressed gather or dense fallback) from sizes every rank has seen, then
issues the variable-length all-gather (:meth:`Transport.allgather_async`). The
shared-index scheme broadcasts one rank's index message instead
(:meth:`Transport.broadcast_async`, its length known from the same size exchange).

"Async" methods issue the collective and return a ``torch.futures.Future``; a backend
without a non-blocking form (Horovod, mpi4py here) completes it before returning. Every
rank must call the same methods in the same order.
"""

from __future__ import annotations

import abc
import importlib

import torch

from ..wire import as_bytes_tensor


def completed(value: object) -> torch.futures.Future:
    """A future that already holds ``value``."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


class Transport(abc.ABC):
    """Collective operations deepreduce needs, over one group of ranks."""

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...

    @abc.abstractmethod
    def allgather_sizes(self, nbytes: int) -> list[int]:
        """Every rank's ``nbytes`` (any int, -1 included), in rank order. Blocking."""

    @abc.abstractmethod
    def allgather_async(self, payload: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        """Issue an all-gather of 1-D uint8 ``payload``s whose lengths are ``sizes``
        (from :meth:`allgather_sizes`). The future's value: every rank's payload, in
        rank order, on ``payload``'s device."""

    @abc.abstractmethod
    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Issue a sum over ranks of ``tensor``, in place; the future's value is ``tensor``."""

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def broadcast_async(self, payload: torch.Tensor, root: int) -> torch.futures.Future:
        """Issue a broadcast of rank ``root``'s 1-D uint8 ``payload``. Every other rank
        passes a buffer of the same length (receivers must know it: exchange it first,
        e.g. with :meth:`allgather_sizes`, or call :meth:`broadcast_varlen`). The future's
        value: the root's bytes on every rank, on ``payload``'s device (possibly
        ``payload`` itself, filled in place).

        This generic form is an all-gather in which only the root sends bytes; the
        torch.distributed, Horovod and mpi4py transports use their native broadcast."""
        payload = check_payload(payload)
        self._check_root(root)
        sizes = [payload.numel() if r == root else 0 for r in range(self.world_size)]
        mine = payload if self.rank == root else payload[:0]
        return self.allgather_async(mine, sizes).then(lambda done: done.value()[root])

    # --- derived -----------------------------------------------------------------------

    def allgather_varlen(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D uint8 ``payload`` (lengths may differ), in rank order. Blocking."""
        payload = check_payload(payload)
        return self.allgather_async(payload, self.allgather_sizes(payload.numel())).wait()

    def broadcast_varlen(self, payload: torch.Tensor | None, root: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Rank ``root``'s 1-D uint8 ``payload`` on every rank (the others pass None and
        get it on ``device``). Blocking; the length travels first, in one small
        all-gather of sizes."""
        self._check_root(root)
        if (self.rank == root) != (payload is not None):
            raise ValueError(f"broadcast_varlen: the root (rank {root}) passes the payload, the other ranks None; "
                             f"rank {self.rank} passed {'nothing' if payload is None else 'a payload'}")
        if payload is not None:
            payload = check_payload(payload)
        size = self.allgather_sizes(payload.numel() if payload is not None else 0)[root]
        buffer = payload if payload is not None else torch.empty(size, dtype=torch.uint8, device=device)
        return self.broadcast_async(buffer, root).wait()

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place and return it. Blocking."""
        return self.allreduce_async(tensor).wait()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Small host-side messages (e.g. configuration descriptions), in rank order."""
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return [bytes(t.cpu().numpy().tobytes()) for t in self.allgather_varlen(tensor)]

    def _check_root(self, root: int) -> None:
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.world_size:
            raise ValueError(f"root must be a rank in [0, {self.world_size}), got {root!r}")

    def _check_sizes(self, payload: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        payload = check_payload(payload)
        if len(sizes) != self.world_size or sizes[self.rank] != payload.numel() or min(sizes) < 0:
            raise ValueError(f"sizes {sizes} do not describe a world of {self.world_size} with this rank's payload of {payload.numel()} bytes")
        return payload


def check_payload(payload: object) -> torch.Tensor:
    """``payload`` if it is a 1-D uint8 tensor, else TypeError/ValueError saying what it is."""
    if not isinstance(payload, torch.Tensor):
        raise TypeError(f"a payload must be a torch.Tensor, got {type(payload).__name__}")
    return as_bytes_tensor(payload, "a payload", error=ValueError).detach()


_TRANSPORTS = {
    "torch": "deepreduce.comm.torch_dist:TorchTransport",
    "horovod": "deepreduce.comm.horovod:HorovodTransport",
    "mpi": "deepreduce.comm.mpi:MPITransport",
}


def transport_class(name: str) -> type[Transport]:
    """The transport class registered under ``name`` (imported on first use)."""
    try:
        target = _TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(sorted(_TRANSPORTS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)

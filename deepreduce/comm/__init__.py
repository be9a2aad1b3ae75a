"""Transports: how payloads travel between ranks.

One implementation per backend (torch.distributed, Horovod, mpi4py), all with the
same small interface, so the same compressor produces the same payloads whatever
carries them. Payloads have different lengths on different ranks, hence
``allgather_varlen``: exchange sizes, pad to the largest, one all-gather, slice.
"""

from __future__ import annotations

import abc
import importlib

import torch


class Transport(abc.ABC):
    """Collective operations deepreduce needs, over one group of ranks."""

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...

    @abc.abstractmethod
    def allgather_varlen(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D uint8 ``payload`` (lengths may differ), in rank order."""

    @abc.abstractmethod
    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (the dense fallback); returns it."""

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Small host-side messages (e.g. compressor specs), in rank order."""
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return [bytes(t.cpu().numpy().tobytes()) for t in self.allgather_varlen(tensor)]


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

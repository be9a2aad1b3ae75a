"""Horovod transport: payloads travel with ``hvd.allgather`` (variable first dimension).

Horovod's allreduce cannot carry sparse payloads, but its allgather concatenates
tensors whose first dimension differs between ranks, which is exactly what a
variable-length uint8 payload needs: one small allgather of the lengths (to split the
result), one allgather of the bytes. No padding.

Horovod 0.28.1 must be built against the installed torch with a C++17 patch: run
``launch/install-horovod.sh`` (``pip install horovod`` fails to build with torch >= 2.1).
Launch with ``horovodrun --gloo -np 2 -H localhost:2 python train.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import Transport

INSTALL_HINT = (
    "Horovod is not installed: pip cannot build horovod 0.28.1 against this torch as released "
    "(it needs a C++17 patch); run launch/install-horovod.sh (about 2 minutes to build on 2 cores, cached afterwards)"
)


def import_horovod() -> Any:
    """``horovod.torch``, or an ImportError that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return hvd


class HorovodTransport(Transport):
    """:class:`~deepreduce.comm.Transport` over Horovod (Gloo or MPI controller; NCCL for GPU tensors).

    Args:
        process_set: a Horovod ``ProcessSet`` (default: all ranks). ``hvd.init()`` must
            have been called.
        name: prefix for the Horovod op names (ops are matched across ranks by name;
            transports used concurrently from different threads need distinct prefixes).
    """

    def __init__(self, process_set: Any = None, name: str = "deepreduce") -> None:
        self.hvd = import_horovod()
        if not self.hvd.is_initialized():
            raise RuntimeError("HorovodTransport needs hvd.init() to have been called first")
        self.process_set = self.hvd.global_process_set if process_set is None else process_set
        self.name = name

    def _op_name(self, what: str) -> str:
        # Horovod matches ops across ranks by name. Every call here waits for its result,
        # so a fixed name per kind of op never has two instances in flight.
        return f"{self.name}.{what}"

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def world_size(self) -> int:
        return self.process_set.size()

    def allgather_varlen(self, payload: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(payload, torch.Tensor):
            raise TypeError(f"allgather_varlen expects a torch.Tensor, got {type(payload).__name__}")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"allgather_varlen expects a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
        payload = payload.detach().contiguous()
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        sizes = self.hvd.allgather(size, name=self._op_name("sizes"), process_set=self.process_set)
        gathered = self.hvd.allgather(payload, name=self._op_name("payload"), process_set=self.process_set)
        return list(torch.split(gathered, sizes.tolist()))

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.hvd.allreduce_(tensor, op=self.hvd.Sum, name=self._op_name("allreduce"), process_set=self.process_set)
        return tensor

    def barrier(self) -> None:
        self.hvd.barrier(process_set=self.process_set)

"""Horovod transport: payloads travel with ``hvd.allgather`` (variable first dimension).

Horovod's allreduce cannot carry sparse payloads, but its allgather concatenates
tensors whose first dimension differs between ranks, which is exactly what a
variable-length uint8 payload needs: with the lengths known (one small allgather), one
allgather of the bytes, split by those lengths. No padding. Every call waits for its
result, so the "async" methods return completed futures.

Horovod 0.28.1 must be built against the installed torch with a C++17 patch: run
``launch/install-horovod.sh`` (``pip install horovod`` fails to build with torch >= 2.1).
Launch with ``horovodrun --gloo -np 2 -H localhost:2 python train.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import Transport, check_payload, completed

# Dtypes Horovod's allreduce sums directly; others go through float32.
_NATIVE_SUM_DTYPES = {torch.float16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8}

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

    def allgather_sizes(self, nbytes: int) -> list[int]:
        size = torch.tensor([nbytes], dtype=torch.int64)
        return self.hvd.allgather(size, name=self._op_name("sizes"), process_set=self.process_set).tolist()

    def allgather_async(self, payload: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        payload = self._check_sizes(payload, sizes).contiguous()
        gathered = self.hvd.allgather(payload, name=self._op_name("payload"), process_set=self.process_set)
        if gathered.numel() != sum(sizes):
            raise RuntimeError(f"horovod allgather returned {gathered.numel()} bytes, the sizes add up to {sum(sizes)}")
        return completed(list(torch.split(gathered.to(payload.device), sizes)))

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Sum over ranks in place. bf16 (which Horovod cannot sum) is summed in float32
        and rounded back; a strided view is summed through a contiguous copy."""
        if tensor.dtype in _NATIVE_SUM_DTYPES and tensor.is_contiguous():
            self.hvd.allreduce_(tensor, op=self.hvd.Sum, name=self._op_name("allreduce"), process_set=self.process_set)
            return completed(tensor)
        work = tensor.detach().to(tensor.dtype if tensor.dtype in _NATIVE_SUM_DTYPES else torch.float32).contiguous()
        self.hvd.allreduce_(work, op=self.hvd.Sum, name=self._op_name("allreduce"), process_set=self.process_set)
        with torch.no_grad():
            tensor.copy_(work)
        return completed(tensor)

    def broadcast_async(self, payload: torch.Tensor, root: int) -> torch.futures.Future:
        payload = check_payload(payload)
        self._check_root(root)
        if payload.numel() == 0:  # every rank knows the length: all skip alike
            return completed(payload)
        # Horovod names the root by its global rank, also within a process set.
        ranks = getattr(self.process_set, "ranks", None)
        global_root = ranks[root] if ranks else root
        got = self.hvd.broadcast(payload.contiguous(), global_root, name=self._op_name("broadcast"),
                                 process_set=self.process_set)
        return completed(got.to(payload.device))

    def barrier(self) -> None:
        self.hvd.barrier(process_set=self.process_set)

"""mpi4py transport: payloads travel with ``Allgatherv`` on host (numpy) buffers.

For training loops driven by ``mpirun``/``mpiexec`` without torch.distributed. Install
with ``pip install -c constraints.txt mpi4py mpich`` (or ``launch/install-mpi.sh``) and
launch with the ``mpiexec`` that belongs to the same MPI (the ``mpich`` wheel installs
it next to the Python interpreter).

Payloads of different lengths need no padding here: one ``Allgather`` of the lengths,
then one ``Allgatherv`` places every rank's bytes at its own offset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import Transport

# Dense fallback: dtypes numpy/MPI can sum directly; others are summed in float32.
_NATIVE_SUM_DTYPES = {torch.float32, torch.float64, torch.int32, torch.int64}


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the mpi transport needs mpi4py: pip install -c constraints.txt mpi4py mpich "
            "(or run launch/install-mpi.sh)"
        ) from exc
    return MPI


def _host_bytes(payload: torch.Tensor) -> np.ndarray:
    if not isinstance(payload, torch.Tensor):
        raise TypeError(f"allgather_varlen expects a torch.Tensor, got {type(payload).__name__}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"allgather_varlen expects a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
    return payload.detach().to("cpu").contiguous().numpy()


class MPITransport(Transport):
    """:class:`~deepreduce.comm.Transport` over an mpi4py communicator.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (default ``MPI.COMM_WORLD``). Every rank of it must
            make the same calls in the same order.

    Tensors on a GPU are staged through host memory (mpi4py's buffer interface here is
    numpy); the gathered payloads come back on the device of the tensor that was sent.
    """

    def __init__(self, comm: Any = None) -> None:
        self._mpi = _import_mpi()
        self.comm = self._mpi.COMM_WORLD if comm is None else comm

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world_size(self) -> int:
        return self.comm.Get_size()

    def allgather_sizes(self, size: int) -> np.ndarray:
        """Every rank's ``size`` (int64), in rank order."""
        sizes = np.empty(self.world_size, dtype=np.int64)
        self.comm.Allgather(np.array([size], dtype=np.int64), sizes)
        return sizes

    def allgather_varlen(self, payload: torch.Tensor) -> list[torch.Tensor]:
        local = _host_bytes(payload)
        sizes = self.allgather_sizes(local.size)
        offsets = np.zeros(self.world_size, dtype=np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        gathered = np.empty(int(sizes.sum()), dtype=np.uint8)
        self.comm.Allgatherv(local, [gathered, sizes, offsets, self._mpi.BYTE])
        flat = torch.from_numpy(gathered).to(payload.device)
        return list(torch.split(flat, sizes.tolist()))

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place. fp16/bf16 are summed in float32 and rounded back
        (MPI has no standard half-precision sum)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"allreduce_ expects a torch.Tensor, got {type(tensor).__name__}")
        direct = tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _NATIVE_SUM_DTYPES
        work = tensor.detach() if direct else tensor.detach().to("cpu").contiguous()
        if work.dtype not in _NATIVE_SUM_DTYPES:
            work = work.float()
        self.comm.Allreduce(self._mpi.IN_PLACE, work.numpy(), op=self._mpi.SUM)
        if not direct:
            with torch.no_grad():
                tensor.copy_(work)
        return tensor

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [bytes(part) for part in self.comm.allgather(bytes(data))]

"""mpi4py transport: payloads travel with ``Allgatherv`` on host (numpy) buffers.

For training loops driven by ``mpirun``/``mpiexec`` without torch.distributed. Install
with ``pip install -c constraints.txt mpi4py mpich`` (or ``launch/install-mpi.sh``) and
launch with the ``mpiexec`` that belongs to the same MPI (the ``mpich`` wheel installs
it next to the Python interpreter).

Payloads of different lengths need no padding here: with the lengths known (one
``Allgather``), one ``Allgatherv`` places every rank's bytes at its own offset. Every
call waits for its result, so the "async" methods return completed futures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import Transport, check_payload, completed

# Dense fallback: dtypes numpy/MPI can sum directly; others are summed in float32.
_NATIVE_SUM_DTYPES = {torch.float32, torch.float64, torch.int32, torch.int64}


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the mpi transport needs mpi4py: install deepreduce's mpi extra (in the checkout: pip install -c "
            "constraints.txt -e '.[mpi]', mpi4py and an MPICH wheel) or run launch/install-mpi.sh"
        ) from exc
    return MPI


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

    def allgather_sizes(self, nbytes: int) -> list[int]:
        sizes = np.empty(self.world_size, dtype=np.int64)
        self.comm.Allgather(np.array([nbytes], dtype=np.int64), sizes)
        return sizes.tolist()

    def allgather_async(self, payload: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        local = self._check_sizes(payload, sizes).to("cpu").contiguous().numpy()
        counts = np.asarray(sizes, dtype=np.int64)
        offsets = np.zeros(self.world_size, dtype=np.int64)
        np.cumsum(counts[:-1], out=offsets[1:])
        gathered = np.empty(int(counts.sum()), dtype=np.uint8)
        self.comm.Allgatherv(local, [gathered, counts, offsets, self._mpi.BYTE])
        flat = torch.from_numpy(gathered).to(payload.device)
        return completed(list(torch.split(flat, sizes)))

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Sum over ranks in place. fp16/bf16 are summed in float32 and rounded back
        (MPI has no standard half-precision sum)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"allreduce expects a torch.Tensor, got {type(tensor).__name__}")
        direct = tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _NATIVE_SUM_DTYPES
        work = tensor.detach() if direct else tensor.detach().to("cpu").contiguous()
        if work.dtype not in _NATIVE_SUM_DTYPES:
            work = work.float()
        self.comm.Allreduce(self._mpi.IN_PLACE, work.numpy(), op=self._mpi.SUM)
        if not direct:
            with torch.no_grad():
                tensor.copy_(work)
        return completed(tensor)

    def broadcast_async(self, payload: torch.Tensor, root: int) -> torch.futures.Future:
        payload = check_payload(payload)
        self._check_root(root)
        host = payload.to("cpu").contiguous().clone() if self.rank == root else torch.empty(payload.numel(), dtype=torch.uint8)
        self.comm.Bcast(host.numpy(), root=root)
        return completed(host.to(payload.device))

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [bytes(part) for part in self.comm.allgather(bytes(data))]

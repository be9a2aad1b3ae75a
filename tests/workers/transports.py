"""The Transport contract, run on every backend: ``python transports.py BACKEND OUT_DIR``.

BACKEND is ``torch`` (gloo group from RANK/WORLD_SIZE/MASTER_PORT), ``mpi`` (under
mpiexec) or ``horovod`` (under horovodrun). Each rank saves what every call returned to
OUT_DIR/rank<r>.npz; the test checks the results are the same on every backend.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from workers.cases import local_payloads


def _torch_reference_gather(payload: torch.Tensor) -> list[torch.Tensor]:
    """The torch.distributed way on gloo, written out: sizes, pad to the largest, one gather."""
    import torch.distributed as dist

    world = dist.get_world_size()
    sizes = torch.empty(world, dtype=torch.int64)
    dist.all_gather_into_tensor(sizes, torch.tensor([payload.numel()], dtype=torch.int64))
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    gathered = torch.empty(world * longest, dtype=torch.uint8)
    dist.all_gather_into_tensor(gathered, padded)
    return [gathered[r * longest : r * longest + int(n)] for r, n in enumerate(sizes.tolist())]


def open_transport(backend: str):
    """(transport, finish) for a backend."""
    if backend == "torch":
        import torch.distributed as dist

        from deepreduce.comm.torch_dist import TorchTransport, close_process_group

        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        return TorchTransport(), close_process_group
    if backend == "mpi":
        from deepreduce.comm.mpi import MPITransport

        transport = MPITransport()
        return transport, transport.barrier
    import horovod.torch as hvd

    from deepreduce.comm.horovod import HorovodTransport

    hvd.init()
    return HorovodTransport(), hvd.shutdown


def main(backend: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    transport, finish = open_transport(backend)
    rank, world = transport.rank, transport.world_size
    arrays: dict[str, np.ndarray] = {}
    for i, payload in enumerate(local_payloads(rank)):
        got = transport.allgather_varlen(payload)
        if backend == "torch":  # the library's gather equals the written-out one
            assert [t.numpy().tobytes() for t in got] == [t.numpy().tobytes() for t in _torch_reference_gather(payload)]
        for src, part in enumerate(got):
            arrays[f"p{i}_from{src}"] = part.numpy()
    # sizes may be any int, -1 (a failed rank) included
    arrays["sizes"] = np.array(transport.allgather_sizes(5 * rank - 1))
    # the async gather with known sizes; rank 0 sends nothing
    mine = torch.full((3 * rank,), rank, dtype=torch.uint8)
    for src, part in enumerate(transport.allgather_async(mine, [3 * r for r in range(world)]).wait()):
        arrays[f"async_from{src}"] = part.numpy()
    for src, data in enumerate(transport.allgather_bytes(bytes(range(3 * rank)))):
        arrays[f"bytes_from{src}"] = np.frombuffer(data, dtype=np.uint8)
    # broadcasts: variable length from the last rank (size unknown to the others), a
    # known length from rank 0, and an empty one (no collective: every rank skips it)
    last = world - 1
    varlen = transport.broadcast_varlen(torch.arange(7 * world, dtype=torch.uint8) if rank == last else None, last)
    arrays["bcast_varlen"] = varlen.numpy()
    known = torch.full((5,), 40 + rank, dtype=torch.uint8)
    arrays["bcast_known"] = transport.broadcast_async(known, 0).wait().numpy().copy()
    arrays["bcast_empty"] = transport.broadcast_async(torch.empty(0, dtype=torch.uint8), last).wait().numpy()
    for bad_root in (world, -1):
        try:
            transport.broadcast_async(known, bad_root)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{backend}: broadcast from root {bad_root} was accepted")
    # sums in place: fp32, and a strided bf16 view (backends without a half sum use fp32)
    dense32 = torch.arange(6, dtype=torch.float32) * (rank + 1)
    assert transport.allreduce_async(dense32).wait() is dense32
    dense16 = (torch.arange(6, dtype=torch.float32) * (rank + 1)).to(torch.bfloat16)[::2]
    transport.allreduce_(dense16)
    arrays["sum32"] = dense32.numpy()
    arrays["sum16"] = dense16.float().numpy()
    arrays["sum16_dtype"] = np.array([str(dense16.dtype)])
    for bad, error in ((torch.zeros(3), ValueError), (b"abc", TypeError)):
        try:
            transport.allgather_async(bad, [3] * world)
        except error:
            pass
        else:
            raise AssertionError(f"{backend}: {bad!r} was accepted as a payload")
    try:
        transport.allgather_async(mine, [7] * world)
    except ValueError:
        pass
    else:
        raise AssertionError(f"{backend}: sizes that do not match the payload were accepted")
    transport.barrier()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out_dir) / f"rank{rank}.npz", **arrays)
    finish()  # every rank leaves together: an exit under live gloo threads can abort


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The Transport contract, checked alike on torch.distributed (gloo), mpi4py and Horovod:
variable-length all-gathers (blocking and with known sizes) byte-identical to the
compressor's payloads, size exchange, small byte messages, broadcasts (of unknown,
known and zero length), in-place sums (fp32 and a strided bf16 view), and the same
argument errors everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from launching import gloo_run, horovod_run, mpi_skip_reason, mpirun, worker
from workers.cases import local_payloads

BACKENDS = ["torch", "mpi", "horovod"]


def check_contract(out_dir, world: int) -> dict[str, bytes]:
    """Every rank's results, checked against what the contract says; returns rank 0's."""
    reference = {src: local_payloads(src) for src in range(world)}
    first = None
    for rank in range(world):
        with np.load(out_dir / f"rank{rank}.npz") as data:
            got = {key: data[key] for key in data.files}
        for src in range(world):
            for i, payload in enumerate(reference[src]):
                assert got[f"p{i}_from{src}"].tobytes() == payload.numpy().tobytes(), f"rank {rank}: payload {i} of rank {src}"
            assert got[f"bytes_from{src}"].tobytes() == bytes(range(3 * src))
            assert got[f"async_from{src}"].tobytes() == bytes([src]) * (3 * src)
        assert got["sizes"].tolist() == [5 * r - 1 for r in range(world)]
        assert got["bcast_varlen"].tolist() == list(range(7 * world))
        assert got["bcast_known"].tolist() == [40] * 5
        assert got["bcast_empty"].size == 0
        factor = world * (world + 1) // 2
        assert got["sum32"].tolist() == [i * factor for i in range(6)]
        assert got["sum16"].tolist() == [float(i * factor) for i in range(0, 6, 2)]
        assert got["sum16_dtype"].tolist() == ["torch.bfloat16"]
        flat = {key: value.tobytes() for key, value in got.items()}
        first = first or flat
        assert flat == first
    return first


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_transport_contract(request, tmp_path, backend, world):
    script = worker("transports")
    if backend == "torch":
        gloo_run(world, script, "torch", str(tmp_path))
    elif backend == "mpi":
        if mpi_skip_reason():
            pytest.skip(mpi_skip_reason())
        mpirun(world, script, "mpi", str(tmp_path))
    else:
        horovod_run(request.getfixturevalue("horovodrun"), world, script, "horovod", str(tmp_path))
    check_contract(tmp_path, world)


def test_generic_broadcast_is_a_gather_from_the_root():
    """The Transport base class's broadcast (for transports without a native one)."""
    import torch

    from helpers import SoloTransport

    solo = SoloTransport()
    payload = torch.arange(11, dtype=torch.uint8)
    assert solo.broadcast_async(payload, 0).wait().tolist() == list(range(11))
    assert solo.broadcast_varlen(payload, 0).tolist() == list(range(11))
    with pytest.raises(ValueError, match="root must be a rank in \\[0, 1\\), got 1"):
        solo.broadcast_async(payload, 1)
    with pytest.raises(ValueError, match="the root \\(rank 0\\) passes the payload"):
        solo.broadcast_varlen(None, 0)


def test_transports_are_registered_by_name():
    from deepreduce.comm import transport_class
    from deepreduce.comm.horovod import HorovodTransport
    from deepreduce.comm.mpi import MPITransport
    from deepreduce.comm.torch_dist import TorchTransport

    assert transport_class("mpi") is MPITransport
    assert transport_class("horovod") is HorovodTransport
    assert transport_class("torch") is TorchTransport
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'; known: horovod, mpi, torch"):
        transport_class("carrier-pigeon")

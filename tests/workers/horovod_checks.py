"""horovodrun worker: ``horovod_checks.py``. The dense fallback of HorovodTransport, and a
configuration mismatch that must raise ConfigError on every rank."""

from __future__ import annotations

import horovod.torch as hvd
import torch

import deepreduce as dr
import deepreduce.horovod
from deepreduce.comm.horovod import HorovodTransport
from workers.models import backward, tiny_model


def main() -> None:
    torch.set_num_threads(1)
    hvd.init()
    transport = HorovodTransport()
    rank = transport.rank
    tensor = torch.full((5,), float(rank + 1))
    transport.allreduce_(tensor)
    assert torch.equal(tensor, torch.full((5,), 3.0)), tensor
    transport.barrier()
    print("dense allreduce ok", flush=True)
    model = tiny_model()
    optimizer = deepreduce.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), min_numel=100 * (rank + 1))
    backward(model, rank)
    try:
        optimizer.step()
    except dr.ConfigError as exc:
        print(f"ConfigError on rank {rank}: {exc}", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()

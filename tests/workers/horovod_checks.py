"""horovodrun worker: ``horovod_checks.py``. The dense fallback of HorovodTransport,
Horovod's resume pattern (rank 0 loads the optimizer state, ``hvd.broadcast_optimizer_state``
hands it on), and a configuration mismatch that must raise ConfigError on every rank."""

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
    # Resuming: only rank 0 holds Adam's state. broadcast_optimizer_state initialises the
    # others' by a step on zero gradients, which must exchange nothing (rank 0 takes no
    # such step: an exchange there would hang).
    model = tiny_model()
    optimizer = deepreduce.horovod.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01),
                                                        model.named_parameters(), min_numel=100)
    if rank == 0:
        saved = torch.optim.Adam(model.parameters(), lr=0.01)
        backward(model, rank)
        saved.step()
        optimizer.load_state_dict(saved.state_dict())
        optimizer.zero_grad()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    first = optimizer.state_dict()["state"][0]["exp_avg"]
    gathered = hvd.allgather(first.unsqueeze(0), name="exp_avg")
    assert torch.equal(gathered[0], gathered[1]) and first.abs().sum() > 0, "rank 0's state did not arrive"
    print(f"resume broadcast ok, exchanges {optimizer.stats()['steps']}", flush=True)
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

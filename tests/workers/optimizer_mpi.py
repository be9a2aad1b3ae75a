"""mpiexec worker: ``optimizer_mpi.py [SCHEME]``. The Horovod DistributedOptimizer's logic
carried by MPI (no Horovod needed): Adam, two backward passes per step, randomk, the
engine's SCHEME (default ``allgather``); prints the parameter digests of every rank and
the losses as one JSON line on rank 0."""

from __future__ import annotations

import hashlib
import json
import sys

import torch

import deepreduce as dr
import deepreduce.horovod
from deepreduce.comm.mpi import MPITransport
from workers.models import tiny_model


def main() -> None:
    torch.set_num_threads(1)
    transport = MPITransport()
    rank = transport.rank
    model = tiny_model()
    optimizer = deepreduce.horovod.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), model.named_parameters(),
        compressor=dr.Compressor.from_spec("randomk:0.1/eliasfano/fp16"), backward_passes_per_step=2,
        min_numel=100, transport=transport, scheme=sys.argv[1] if len(sys.argv) > 1 else "allgather",
    )
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        total = 0.0
        for micro in range(2):
            gen = torch.Generator().manual_seed(rank * 100 + micro)
            x = torch.randn(32, 40, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), x[:, :3]) / 2
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(sum(transport.comm.allgather(total)) / transport.world_size)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    digests = transport.comm.allgather(digest)
    if rank == 0:
        print(json.dumps({"digests": digests, "losses": losses, "stats": optimizer._deepreduce.stats()}))


if __name__ == "__main__":
    main()

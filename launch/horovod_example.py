"""A tiny model trained with deepreduce's Horovod DistributedOptimizer.

    launch/install-horovod.sh                              # patched Horovod 0.28.1 build
    .venv/bin/horovodrun --gloo -np 2 -H localhost:2 .venv/bin/python launch/horovod_example.py

The same model and data as launch/mpi_example.py; gradients are compressed per tensor,
all-gathered with hvd.allgather, decoded and averaged in rank order. Rank 0 prints
whether all ranks end with bitwise-identical parameters (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepreduce as dr  # noqa: E402
import deepreduce.horovod  # noqa: E402
from mpi_example import build_model, parameter_digest, shard  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="topk:0.05/eliasfano/fp16", help="compressor spec (default %(default)s)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--backward-passes", type=int, default=1, help="micro-batches accumulated per step")
    parser.add_argument("--min-numel", type=int, default=1024, help="smaller tensors travel uncompressed")
    parser.add_argument("--json", action="store_true", help="rank 0 also prints the results as one JSON line")
    args = parser.parse_args(argv)

    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)  # several ranks share the machine's cores
    rank, world = hvd.rank(), hvd.size()

    model = build_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = deepreduce.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr),
        model.named_parameters(),
        compressor=dr.Compressor.from_spec(args.spec),
        backward_passes_per_step=args.backward_passes,
        min_numel=args.min_numel,
    )
    x, y = shard(rank)
    micro_x, micro_y = x.chunk(args.backward_passes), y.chunk(args.backward_passes)
    losses = []
    for _ in range(args.steps):
        optimizer.zero_grad()
        total = 0.0
        for mx, my in zip(micro_x, micro_y):
            loss = torch.nn.functional.mse_loss(model(mx), my) / args.backward_passes
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(hvd.allreduce(torch.tensor(total), op=hvd.Average, name="loss").item())

    digests = hvd.allgather_object(parameter_digest(model))
    agree = len(set(digests)) == 1
    if rank == 0:
        stats = optimizer.stats()
        print(f"{world} ranks, {args.spec}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps, "
              f"{stats['sent_bytes'] / stats['steps']:.0f} bytes sent per rank per step "
              f"({stats['ratio']:.1f}x less than dense)")
        if agree:
            print(f"parameters agree on all {world} ranks (sha256 {digests[0][:16]})")
        else:
            print("parameters DIFFER across ranks: " + ", ".join(f"rank {r}: {d[:16]}" for r, d in enumerate(digests)))
        if args.json:
            print(json.dumps({"world_size": world, "agree": agree, "digests": digests, "losses": losses, "stats": stats}))
    hvd.shutdown()
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

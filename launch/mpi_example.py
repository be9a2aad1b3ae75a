"""A tiny model trained with compressed gradients over MPI (mpi4py, no torch.distributed).

    launch/install-mpi.sh                                  # mpi4py + MPICH wheels
    .venv/bin/mpiexec -n 2 .venv/bin/python launch/mpi_example.py

Each rank fits its own shard of a synthetic regression problem; gradients are
compressed (top-k + Elias-Fano + fp16 by default), all-gathered with Allgatherv, decoded
and averaged in rank order. At the end every rank hashes its parameters and rank 0
prints whether all ranks hold bitwise-identical parameters (exit status 1 if not).
MPICH's mpiexec runs as root as is; Open MPI's needs --allow-run-as-root --oversubscribe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

import deepreduce as dr
import deepreduce.mpi


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def shard(rank: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data: a shared linear target, rank-specific inputs and noise."""
    truth = torch.Generator().manual_seed(1234)
    w = torch.randn(32, 1, generator=truth)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, 32, generator=gen)
    y = torch.tanh(x @ w / 4) + 0.01 * torch.randn(n, 1, generator=gen)
    return x, y


def parameter_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="topk:0.05/eliasfano/fp16", help="compressor spec (default %(default)s)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--min-numel", type=int, default=1024, help="smaller tensors travel uncompressed")
    parser.add_argument("--json", action="store_true", help="rank 0 also prints the results as one JSON line")
    args = parser.parse_args(argv)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)  # several ranks share the machine's cores

    model = build_model()
    deepreduce.mpi.broadcast_parameters(model.state_dict().values(), comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    averager = deepreduce.mpi.GradientAverager(
        model.named_parameters(), dr.Compressor.from_spec(args.spec), comm, min_numel=args.min_numel
    )
    x, y = shard(rank)
    losses = []
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        averager.synchronize()
        optimizer.step()
        losses.append(comm.allreduce(loss.item()) / world)

    digests = comm.gather(parameter_digest(model), root=0)
    if rank != 0:
        return 0
    agree = len(set(digests)) == 1
    stats = averager.stats()
    print(f"{world} ranks, {args.spec}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps, "
          f"{stats['sent_bytes'] / stats['steps']:.0f} bytes sent per rank per step "
          f"({stats['ratio']:.1f}x less than dense)")
    if agree:
        print(f"parameters agree on all {world} ranks (sha256 {digests[0][:16]})")
    else:
        print("parameters DIFFER across ranks: " + ", ".join(f"rank {r}: {d[:16]}" for r, d in enumerate(digests)))
    if args.json:
        print(json.dumps({"world_size": world, "agree": agree, "digests": digests, "losses": losses, "stats": stats}))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

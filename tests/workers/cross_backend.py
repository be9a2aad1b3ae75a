"""The same per-rank gradients averaged by one front end: ``cross_backend.py FRONT_END SPEC OUT_DIR``.

FRONT_END: ``ddp`` (the DDP comm hook over a gloo group from RANK/WORLD_SIZE/MASTER_PORT),
``horovod`` (``deepreduce.horovod.DistributedOptimizer`` under horovodrun) or ``mpi``
(``deepreduce.mpi.GradientAverager`` under mpiexec). Each rank saves the averaged
gradients of every step and the header of every payload it made to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import deepreduce as dr

# fp32 and fp16 parameters; the biases are below MIN_NUMEL and travel raw.
SHAPES = [("a_weight", (40, 50), torch.float32), ("a_bias", (50,), torch.float32), ("b_weight", (30, 60), torch.float32),
          ("h_weight", (64, 40), torch.float16), ("h_bias", (40,), torch.float16)]
MIN_NUMEL = 100
STEPS = 4


class Holder(torch.nn.Module):
    """Parameters whose gradient is exactly the tensor handed to forward: d(sum(p*g))/dp = g."""

    def __init__(self) -> None:
        super().__init__()
        for name, shape, dtype in SHAPES:
            self.register_parameter(name, torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))

    def forward(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * g).sum().float() for p, g in zip(self.parameters(), grads))


def gradients(rank: int, step: int) -> list[torch.Tensor]:
    out = []
    for i, (_, shape, dtype) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(1_000 * rank + 100 * step + i)
        out.append(torch.randn(shape, generator=gen).to(dtype))
    return out


def recording(compressor: dr.Compressor, log: list) -> dr.Compressor:
    """Record (key, dtype, bytes) of every payload the compressor makes."""
    inner = compressor.compress_detailed

    def compress_detailed(tensor, *, step=None, key=0, **options):
        result = inner(tensor, step=step, key=key, **options)
        log.append((step, key, str(dr.read_header(result.payload).dtype), result.payload.numel()))
        return result

    compressor.compress_detailed = compress_detailed
    return compressor


def main(front_end: str, spec: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    model = Holder()
    log: list = []
    compressor = recording(dr.Compressor.from_spec(spec, seed=3), log)
    if front_end == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from deepreduce.comm.torch_dist import close_process_group

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        ddp = DDP(model)
        state = dr.DeepReduceState(None, compressor, start_iter=0, min_numel=MIN_NUMEL, stats_every=0,
                                   named_parameters=model.named_parameters())
        ddp.register_comm_hook(state, dr.deepreduce_hook)

        def average(grads):
            ddp(grads).backward()

        finish = close_process_group
    elif front_end == "horovod":
        import horovod.torch as hvd

        import deepreduce.horovod

        hvd.init()
        rank = hvd.rank()
        optimizer = deepreduce.horovod.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), model.named_parameters(), compressor=compressor, min_numel=MIN_NUMEL)

        def average(grads):
            model(grads).backward()
            optimizer.synchronize()

        finish = hvd.shutdown
    else:
        import deepreduce.mpi

        averager = deepreduce.mpi.GradientAverager(model.named_parameters(), compressor, min_numel=MIN_NUMEL)
        rank = averager.transport.rank

        def average(grads):
            model(grads).backward()
            averager.synchronize()

        finish = averager.transport.barrier
    steps = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        average(gradients(rank, step))
        steps.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"grads": steps, "payloads": sorted(log, key=str)}, Path(out_dir) / f"rank{rank}.pt")
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])

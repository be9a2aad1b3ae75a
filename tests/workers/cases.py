"""Inputs shared by workers and the tests that check them: payload cases, a small model's
per-rank gradients, and the in-process replay of the engine's averaging."""

from __future__ import annotations

import torch

import deepreduce as dr

# (spec, numel): every index/value codec family the core ships, random and exact selection.
PAYLOAD_CASES = [
    ("topk:0.05/eliasfano/fp16", 5000),
    ("randomk:0.1/rle/raw", 3001),
    ("topk:0.01/zstd/bf16", 20000),
    ("topk:0.2/raw/zstd", 777),
]
PAYLOAD_STEPS = (0, 3)
SEED = 7


def case_gradient(rank: int, case: int, step: int, numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * rank + 100 * case + step)
    return torch.randn(numel, generator=gen) * (1 + case)


def local_payloads(rank: int) -> list[torch.Tensor]:
    """What ``rank`` sends, computed directly with the compressor (the reference)."""
    out = []
    for case, (spec, numel) in enumerate(PAYLOAD_CASES):
        compressor = dr.Compressor.from_spec(spec, seed=SEED)
        for step in PAYLOAD_STEPS:
            out.append(compressor.compress(case_gradient(rank, case, step, numel), step=step, key=case))
    return out


# --- a small model with fixed per-rank gradients --------------------------------------------------

MODEL_SHAPES = [("embed.weight", (40, 50)), ("proj.weight", (30, 60)), ("proj.bias", (30,)), ("scale", (7,))]
EXCHANGE_SPEC = "topk:0.03/eliasfano/fp16"
EXCHANGE_MIN_NUMEL = 100


def model_gradients(rank: int, step: int, shapes=MODEL_SHAPES, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(50_000 + 1000 * rank + step)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes}


def make_parameters(shapes=MODEL_SHAPES) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, torch.nn.Parameter(torch.zeros(shape))) for name, shape in shapes]


def expected_averages(world: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """The averaged gradients of each step, replayed in process: each parameter compressed
    on its own (key = its name) with error feedback, receivers add ``decoded / W`` in rank
    order; parameters below ``EXCHANGE_MIN_NUMEL`` travel raw."""
    compressor = {r: dr.Compressor.from_spec(EXCHANGE_SPEC) for r in range(world)}
    residual: dict[tuple[int, str], torch.Tensor] = {}
    results = []
    for step in range(steps):
        totals = {name: torch.zeros(torch.Size(shape).numel()) for name, shape in MODEL_SHAPES}
        for rank in range(world):
            grads = model_gradients(rank, step)
            for name, _ in MODEL_SHAPES:
                flat = grads[name].reshape(-1)
                if flat.numel() < EXCHANGE_MIN_NUMEL:
                    totals[name] += flat / world
                    continue
                compensated = flat + residual.get((rank, name), torch.zeros_like(flat))
                sent = compressor[rank].compress_detailed(compensated, step=step, key=name).sent
                residual[(rank, name)] = compensated - sent.to_dense(flat.dtype)
                totals[name].index_add_(0, sent.indices, sent.values / world)
        results.append({name: totals[name].reshape(shape) for name, shape in MODEL_SHAPES})
    return results


def allreduce_reference(world: int) -> list[torch.Tensor]:
    """``deepreduce.mpi.allreduce_compressed`` of one tensor over two steps, replayed."""
    compressor = {r: dr.Compressor(ratio=0.02, index="rle", value="raw") for r in range(world)}
    residual = {r: torch.zeros(4096) for r in range(world)}
    out = []
    for step in range(2):
        total = torch.zeros(4096)
        for rank in range(world):
            compensated = case_gradient(rank, 9, step, 4096) + residual[rank]
            sent = compressor[rank].compress_detailed(compensated, step=step, key=5).sent
            residual[rank] = compensated - sent.to_dense()
            total.index_add_(0, sent.indices, sent.values / world)
        out.append(total.reshape(64, 64))
    return out

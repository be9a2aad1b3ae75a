"""mpiexec worker: ``mpi_average.py OUT_DIR``. The mpi4py averager over three steps, one
tensor through ``allreduce_compressed``, and configuration mismatches; each rank saves
what it got to OUT_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import deepreduce as dr
import deepreduce.mpi
from workers.cases import EXCHANGE_MIN_NUMEL, EXCHANGE_SPEC, case_gradient, make_parameters, model_gradients


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    params = make_parameters()
    averager = deepreduce.mpi.GradientAverager(params, dr.Compressor.from_spec(EXCHANGE_SPEC), min_numel=EXCHANGE_MIN_NUMEL,
                                               dense_fallback=False)
    rank = averager.transport.rank
    results = []
    for step in range(3):
        for name, param in params:
            param.grad = model_gradients(rank, step)[name].clone()
        averager.synchronize()
        results.append({name: param.grad.clone() for name, param in params})
    memory = deepreduce.mpi.ErrorFeedback()
    compressor = dr.Compressor(ratio=0.02, index="rle", value="raw")
    reduced = [
        deepreduce.mpi.allreduce_compressed(case_gradient(rank, 9, step, 4096).reshape(64, 64), compressor,
                                            step=step, bucket=5, memory=memory)
        for step in range(2)
    ]
    torch.save({"exchange": results, "allreduce": reduced, "stats": averager.stats()}, out / f"rank{rank}.pt")
    # a rank with another compressor: every rank raises ConfigError naming the difference
    spec = EXCHANGE_SPEC if rank != 1 else "topk:0.05/eliasfano/fp16"
    mismatched = deepreduce.mpi.GradientAverager(make_parameters(), dr.Compressor.from_spec(spec), min_numel=EXCHANGE_MIN_NUMEL)
    try:
        mismatched.synchronize()
    except dr.ConfigError as exc:
        (out / f"mismatch{rank}.txt").write_text(f"ConfigError: {exc}")
    # one tensor with another compressor on rank 1 (presized on one rank, sizes exchanged on the
    # other: without the check the ranks ran different collectives and hung), then another length
    tensor = case_gradient(rank, 9, 0, 4096)
    other = dr.Compressor.from_spec("topk:0.02/eliasfano/fp16" if rank != 1 else "topk:0.05/zstd/raw")
    errors = []
    for compressor, tensor in ((other, tensor), (dr.Compressor.from_spec("topk:0.02/eliasfano/fp16"), tensor[:4000 + rank])):
        try:
            deepreduce.mpi.allreduce_compressed(tensor, compressor, step=0)
            errors.append("no error")
        except dr.DeepReduceError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    (out / f"one_tensor_mismatch{rank}.json").write_text(json.dumps(errors))
    averager.transport.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])

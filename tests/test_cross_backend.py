"""One engine, three front ends: the same per-rank gradients averaged through the DDP
hook (gloo), the Horovod optimizer (horovodrun) and the mpi4py averager (mpiexec) give
bitwise-identical gradients, for a lossless and a lossy spec, fp32 and fp16 parameters;
fp16 parameters put fp16 values on the wire in every front end."""

from __future__ import annotations

import ast

import pytest
import torch

from launching import gloo_run, horovod_run, mpirun, needs_mpi, worker

pytestmark = pytest.mark.slow

SPECS = {
    "lossless": "topk:0.1/eliasfano/raw",
    "lossy": "randomk:0.05/rle/qsgd:bits=4",  # random selection and stochastic rounding: the streams must match too
}


def tensor_names(key: str) -> tuple[str, ...]:
    """The tensors a payload's stream key names (tensors sharing a payload: their tuple)."""
    return ast.literal_eval(key) if key.startswith("(") else (key,)


def load(out, world: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@needs_mpi
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_front_ends_average_bitwise_alike(horovodrun, tmp_path, kind):
    spec, world = SPECS[kind], 2
    script = worker("cross_backend")
    gloo_run(world, script, "ddp", spec, str(tmp_path / "ddp"))
    horovod_run(horovodrun, world, script, "horovod", spec, str(tmp_path / "horovod"))
    mpirun(world, script, "mpi", spec, str(tmp_path / "mpi"))
    results = {front: load(tmp_path / front, world) for front in ("ddp", "horovod", "mpi")}
    reference = results["ddp"]
    assert len(reference[0]["grads"]) == 4
    for front, ranks in results.items():
        for rank, got in enumerate(ranks):
            for step, (want, have) in enumerate(zip(reference[0]["grads"], got["grads"], strict=True)):
                for name in want:
                    assert have[name].dtype == want[name].dtype, (front, rank, step, name)
                    assert torch.equal(have[name], want[name]), f"{front} rank {rank} step {step}: {name} differs from ddp rank 0"
            # the two front ends that lay out their own buffers made the same payloads (keys, dtypes, sizes) on
            # every rank; DDP's bucket puts a bias between the weights, which they lay next to each other
            if front == "mpi":
                assert got["payloads"] == results["horovod"][rank]["payloads"], rank
            dtypes = {name: dtype for _, key, dtype, _ in got["payloads"] for name in tensor_names(key)}
            assert dtypes == {"a_weight": "torch.float32", "b_weight": "torch.float32", "h_weight": "torch.float16"}, front
    shared = {key for _, key, _, _ in results["horovod"][0]["payloads"]}
    assert ("('a_weight', 'b_weight')" in shared) == (kind == "lossless"), shared  # qsgd's stream is per payload
    last = reference[0]["grads"][-1]
    assert all(torch.isfinite(t.float()).all() for t in last.values())
    # the biases travel raw (below min_numel): every element is the plain mean
    assert int(torch.count_nonzero(last["a_bias"])) == 50

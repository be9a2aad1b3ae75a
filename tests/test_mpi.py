"""mpi4py front end: the averager's exact averages across 2 and 3 ranks, one tensor
through ``allreduce_compressed``, the configuration check, and the mpirun example.

They need mpi4py and MPICH (part of the ``test`` extra; ``launch/install-mpi.sh`` installs
them elsewhere) and skip, saying so, without. Workers: ``tests/workers/``."""

from __future__ import annotations

import json

import pytest
import torch

from launching import ROOT, mpirun, needs_mpi, worker
from workers.cases import EXCHANGE_SPEC, MODEL_SHAPES, allreduce_reference, expected_averages

pytestmark = [needs_mpi, pytest.mark.slow]


@pytest.mark.parametrize("world", [2, 3])
def test_mpi_averaging_is_exact_and_identical_across_ranks(tmp_path, world):
    mpirun(world, worker("mpi_average"), str(tmp_path))
    specs = ", ".join(f"rank {r}='{EXCHANGE_SPEC if r != 1 else 'topk:0.05/eliasfano/fp16'}'" for r in range(world))
    for rank in range(world):
        error = (tmp_path / f"mismatch{rank}.txt").read_text()
        assert error.startswith(f"ConfigError: deepreduce: ranks disagree on the compression configuration (compressor: {specs}; fingerprint: ")
        one_tensor = json.loads((tmp_path / f"one_tensor_mismatch{rank}.json").read_text())
        assert one_tensor[0].startswith("ConfigError: deepreduce: ranks disagree on the compression configuration"), one_tensor
        # the length differs only in what is gathered: the decoded payload says so, as a DecodeError
        assert one_tensor[1].startswith("DecodeError: segment 0: rank ") and "do all ranks reduce the same tensors?" in one_tensor[1]
    expected = expected_averages(world, 3)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(3):
            for name, _ in MODEL_SHAPES:
                assert torch.equal(got["exchange"][step][name], expected[step][name]), (rank, step, name)
        for got_step, expected_step in zip(got["allreduce"], allreduce_reference(world), strict=True):
            assert torch.equal(got_step, expected_step), rank
        stats = got["stats"]
        assert stats["steps"] == 3 and stats["compressed_buckets"] == 3 and stats["ratio"] > 5


@pytest.mark.parametrize("world, spec", [(2, "topk:0.05/eliasfano/fp16"), (3, "randomk:0.1/rle/bf16")])
def test_mpi_example_trains_with_identical_parameters(world, spec):
    proc = mpirun(world, str(ROOT / "launch" / "mpi_example.py"), "--json", "--spec", spec, "--steps", "30")
    *text, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["world_size"] == world
    assert result["agree"] and len(set(result["digests"])) == 1 and len(result["digests"]) == world
    assert f"parameters agree on all {world} ranks (sha256 {result['digests'][0][:16]})" in text
    assert result["losses"][-1] < 0.25 * result["losses"][0]
    assert result["stats"]["ratio"] > 4


def test_distributed_optimizer_over_mpi_keeps_ranks_identical():
    """The Horovod optimizer's logic with 3 real ranks, carried by MPI instead of Horovod."""
    proc = mpirun(3, worker("optimizer_mpi"))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["digests"]) == 3 and len(set(result["digests"])) == 1
    assert result["losses"][-1] < 0.5 * result["losses"][0]

"""The comm hook across processes: torchrun with 2 and 3 ranks (gloo).

One launch per world size runs every check (tests/workers/hook_checks.py); the tests here
compare what the ranks wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launching import worker_env
from workers import hook_checks as worker

pytestmark = pytest.mark.slow

WORKER = Path(worker.__file__)


def torchrun(nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = worker_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def launch(tmp_path_factory, nproc: int, checks: str, *worker_args: str) -> list[dict]:
    """Run the worker's ``checks`` on ``nproc`` ranks; every rank's results, none failed."""
    out = tmp_path_factory.mktemp(f"hook{nproc}")
    result = torchrun(nproc, [str(WORKER), str(out), "--checks", checks, *worker_args])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    for rank, checks_done in enumerate(ranks):
        for name, entry in checks_done.items():
            if name.startswith("_"):  # timings
                continue
            assert "error" not in entry, f"rank {rank}, check {name}:\n{entry['error']}"
    return ranks


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory, 2, "specs,auto,bucket,dtypes,equals_allreduce,fallback,nonfinite_amp,nonfinite_fp16,"
                                        "resume_layout,nonfinite_raise,encode_failure,mismatch,presized")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return launch(tmp_path_factory, 3, "specs,auto,fallback,mismatch,presized")


EXPECTED_SPECS = [spec for spec in worker.SPECS if worker.available(spec)]


@pytest.mark.parametrize("world", ["two", "three"])
def test_parameters_stay_bitwise_identical(world, request):
    ranks = request.getfixturevalue(world)
    results = [r["specs"] for r in ranks]
    assert sorted(results[0]) == sorted(EXPECTED_SPECS)
    for spec in EXPECTED_SPECS:
        digests = {r[spec]["digest"] for r in results}
        assert len(digests) == 1, f"{spec}: ranks diverged after {worker.STEPS} steps"
        first = results[0][spec]
        assert first["digest"] != first["initial"]
        stats = first["stats"]
        assert stats["steps"] == worker.STEPS
        assert stats["compressed_buckets"] > 0 and stats["dense_fallbacks"] == 0, stats
        assert stats["ratio"] > 2, stats


def test_bucket_granularity_keeps_parameters_identical(two):
    for spec, first in two[0]["bucket"].items():
        assert first["digest"] == two[1]["bucket"][spec]["digest"], spec
        assert first["stats"]["compressed_buckets"] > 0 and first["stats"]["dense_fallbacks"] == 0, spec


def test_lossy_codecs_are_covered_when_registered():
    import deepreduce as dr

    lossy_index = [n for n in dr.index_codecs() if not dr.codecs.INDEX_CODECS.lookup(n).lossless]
    lossy_value = [n for n in dr.value_codecs() if not dr.codecs.VALUE_CODECS.lookup(n).lossless]
    covered = " ".join(EXPECTED_SPECS)
    for name in lossy_index + lossy_value:
        assert f"/{name}" in covered, f"lossy codec {name!r} is registered but no spec in workers/hook_checks.SPECS uses it"


def test_half_precision_buckets(two):
    for dtype in ("torch.float16", "torch.bfloat16"):
        assert two[0]["dtypes"][dtype]["digest"] == two[1]["dtypes"][dtype]["digest"], dtype
        assert two[0]["dtypes"][dtype]["stats"]["compressed_buckets"] > 0


def test_lossless_full_ratio_matches_builtin_allreduce(two):
    for rank in two:
        for spec, entry in rank["equals_allreduce"].items():
            assert entry["stats"]["compressed_buckets"] > 0 and entry["stats"]["dense_fallbacks"] == 0, spec
            assert entry["grad_diff"] <= 1e-6 * entry["grad_scale"], (spec, entry)
            assert entry["param_diff"] <= 1e-6, (spec, entry)


@pytest.mark.parametrize("world", ["two", "three"])
def test_dense_fallback_when_gather_costs_more(world, request):
    ranks = request.getfixturevalue(world)
    entries = [r["fallback"] for r in ranks]
    assert len({e["digest"] for e in entries}) == 1
    stats = entries[0]["stats"]
    assert stats["dense_fallbacks"] > 0 and stats["compressed_buckets"] == 0, stats
    assert stats["ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("world", ["two", "three"])
def test_spec_mismatch_fails_fast_on_every_rank(world, request):
    ranks = request.getfixturevalue(world)
    for rank in ranks:
        entry = rank["mismatch"]
        assert entry["raised"], "a rank trained on with a mismatched compressor"
        assert "ConfigError" in entry["message"] and "disagree" in entry["message"]
        assert "topk:0.05/eliasfano/fp16" in entry["message"] and "topk:0.1/eliasfano/fp16" in entry["message"]


def test_one_rank_failing_to_compress_fails_every_rank(two):
    own, other = two[1]["encode_failure"], two[0]["encode_failure"]
    assert own["raised"] and "injected encode failure" in own["message"]
    assert other["raised"] and "DeepReduceError" in other["message"] and "rank 1 failed to compress" in other["message"]
    assert "at step 3" in other["message"]
    # Without a size exchange every rank learns of it when DDP waits for the buckets (the
    # failing rank too: it joins the step's collectives first), after the hook closed step 3.
    assert own["step"] in (3, 4) and other["step"] in (3, 4)


def test_nonfinite_gradients_skip_the_same_steps_as_plain_ddp_under_amp(two):
    """Rank 1's gradient gets Inf, -Inf, NaN at three steps: GradScaler skips exactly
    those steps and follows the same scale schedule as with the built-in allreduce hook;
    no residual or momentum buffer keeps a non-finite value; ranks stay identical."""
    reference = two[0]["nonfinite_amp"]["allreduce"]
    assert reference["skipped"] == sorted(worker.POISONED)
    for run_name, run in two[0]["nonfinite_amp"].items():
        assert run["skipped"] == reference["skipped"] and run["scales"] == reference["scales"], run_name
        assert run["digest"] == two[1]["nonfinite_amp"][run_name]["digest"], run_name
        if run_name != "allreduce":
            assert run["residuals_finite"] and two[1]["nonfinite_amp"][run_name]["residuals_finite"], run_name
            assert run["stats"]["nonfinite_buckets"] == len(worker.POISONED), run_name


def test_nonfinite_fp16_buckets_match_allreduce_positions(two):
    for rank in two:
        entry = rank["nonfinite_fp16"]
        assert entry["deepreduce"]["nonfinite"] == entry["allreduce"]["nonfinite"] == {"5": {"head.weight": [3, 700]}}
        assert entry["deepreduce"]["residuals_finite"]
    assert two[0]["nonfinite_fp16"]["deepreduce"]["digest"] == two[1]["nonfinite_fp16"]["deepreduce"]["digest"]


def test_nonfinite_raise_stops_every_rank_naming_rank_bucket_and_step(two):
    for rank in two:
        entry = rank["nonfinite_raise"]
        assert entry["raised"] and entry["step"] == 4
        assert "NonFiniteError" in entry["message"] and "rank 1" in entry["message"] and "step 4" in entry["message"]


def test_resume_into_another_bucket_layout_loses_nothing(two):
    """No settling pass, another bucket_cap_mb: per-parameter residuals make the resumed
    run bitwise equal to the uninterrupted one; with one top-k per bucket every saved
    parameter's residual is carried into the new layout."""
    for rank in two:
        tensor, bucket = rank["resume_layout"]["tensor"], rank["resume_layout"]["bucket"]
        assert tensor["resumed"] == tensor["uninterrupted"]
        for entry in (tensor, bucket):
            assert entry["saved_residuals"] and entry["end_residuals"] == entry["saved_residuals"]
            assert entry["residuals_finite"]
    assert two[0]["resume_layout"]["bucket"]["resumed"] == two[1]["resume_layout"]["bucket"]["resumed"]


@pytest.mark.parametrize("world", ["two", "three"])
def test_computed_sizes_skip_the_exchange_and_match_the_exchange_path(world, request):
    """Without a size exchange (sizes computed on every rank) training ends bitwise where
    it does with one, on every rank; the exchange runs only where sizes are data-dependent."""
    ranks = request.getfixturevalue(world)
    for spec, options in worker.PRESIZED_SPECS:
        auto = [r["presized"][f"{spec} {options} auto"] for r in ranks]
        always = [r["presized"][f"{spec} {options} always"] for r in ranks]
        assert len({run["digest"] for run in auto + always}) == 1, (spec, options)
        for a, b in zip(auto, always):
            assert a["stats"]["size_exchanges"] == 0, (spec, options)
            assert b["stats"]["size_exchanges"] == b["stats"]["compressed_buckets"] + b["stats"]["dense_fallbacks"] > 0
            assert a["stats"]["compressed_buckets"] == b["stats"]["compressed_buckets"]



@pytest.mark.parametrize("world", ["two", "three"])
def test_auto_plan_agrees_across_ranks_and_resumes_bit_for_bit(world, request):
    results = [r["auto"] for r in request.getfixturevalue(world)]
    for run in ("measured", "slow", "fast", "resumed"):
        assert len({json.dumps(r[run], sort_keys=True) for r in results}) == 1, (run, results)
    auto = results[0]
    assert auto["measured"]["plan"], "every large bucket gets a plan"
    slow_options = set(auto["slow"]["plan"].values())
    assert slow_options <= {"topk:0.2/eliasfano/fp16", "topk:0.05/eliasfano/fp16"} and auto["slow"]["compressed_buckets"]
    assert auto["slow"]["replans"] >= 1, auto["slow"]  # drift 1e-9: drift checks after the baseline re-plan
    assert set(auto["fast"]["plan"].values()) == {"dense"} and auto["fast"]["compressed_buckets"] == 0
    assert auto["resumed"]["digest"] == auto["slow"]["digest"]

"""`deepreduce train` under torchrun (2 ranks): checkpoint/resume is bitwise exact in the
gradient and the update mode and for --task classify, the built-in comparison hooks run,
metrics are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launching import worker_env
from workers import train_runs as worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker.__file__, str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=worker_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def records(path: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if "step" in r], [r["summary"] for r in lines if "summary" in r]


def test_resume_continues_bitwise(runs):
    full, [full_summary] = records(runs / "full.jsonl")
    part, summaries = records(runs / "part.jsonl")
    assert [r["step"] for r in full] == list(range(1, worker.STEPS + 1))
    assert [r["step"] for r in part] == list(range(1, worker.STEPS + 1))
    for a, b in zip(full, part):
        assert a["loss"] == b["loss"], (a, b)
        assert a["bytes_sent"] == b["bytes_sent"], (a, b)
        if a["step"] > worker.STOP and "val_loss" in a:
            assert a["val_loss"] == b["val_loss"]
    assert summaries[-1]["params_digest"] == full_summary["params_digest"]
    for rank in range(2):
        a = torch.load(runs / "full" / f"rank{rank}.pt", weights_only=False)
        b = torch.load(runs / "resumed" / f"rank{rank}.pt", weights_only=False)
        assert a["step"] == b["step"] == worker.STEPS
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), name
        for pid, state in a["optimizer"]["state"].items():
            for field, value in state.items():
                assert torch.equal(value, b["optimizer"]["state"][pid][field]), (pid, field)
        residuals_a, residuals_b = a["hook"]["memory"]["residuals"], b["hook"]["memory"]["residuals"]
        assert residuals_a and residuals_a.keys() == residuals_b.keys()
        for key in residuals_a:
            assert torch.equal(residuals_a[key], residuals_b[key]), key
        assert a["hook"]["step"] == b["hook"]["step"] == worker.STEPS
    # ... and the two ranks hold the same model.
    r0 = torch.load(runs / "full" / "rank0.pt", weights_only=False)["model"]
    r1 = torch.load(runs / "full" / "rank1.pt", weights_only=False)["model"]
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_metrics_fields(runs):
    steps, [summary] = records(runs / "full.jsonl")
    for record in steps:
        assert {"step", "loss", "lr", "bytes_sent", "step_s", "comm_s"} <= record.keys()
        assert record["step_s"] > 0 and record["comm_s"] >= 0
    evals = [r["step"] for r in steps if "val_loss" in r]
    assert evals == [4, 8, 12, 14]
    dense = summary["dense_bytes_per_step"]
    assert steps[0]["bytes_sent"] == dense  # before start_iter: plain allreduce
    assert 0 < steps[-1]["bytes_sent"] < dense / 5
    hook = summary["hook"]
    assert hook["steps"] == worker.STEPS and hook["compressed_buckets"] > 0 and hook["ratio"] > 1


def test_builtin_hooks_for_comparison(runs):
    results = {name: records(runs / f"{name}.jsonl") for name in ("dense", "fp16", "powersgd")}
    for name, (steps, [summary]) in results.items():
        assert len(steps) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps), name
    dense = results["dense"][1][0]["dense_bytes_per_step"]
    assert all(r["bytes_sent"] == dense for r in results["dense"][0])
    assert all(r["bytes_sent"] == dense // 2 for r in results["fp16"][0])
    powersgd = [r["bytes_sent"] for r in results["powersgd"][0]]
    assert powersgd[0] == dense and 0 < powersgd[-1] < dense / 2
    # Same seed, same data, same first step: the three runs start from the same loss.
    assert len({round(results[n][0][0]["loss"], 5) for n in results}) == 1


def test_resume_refuses_other_optimizer_or_data(runs):
    optimizer, data = (runs / "refused.txt").read_text().splitlines()
    assert optimizer == "deepreduce train: checkpoint used --optimizer adam, not sgd"
    assert data.startswith("deepreduce train: checkpoint trained on stdlib (corpus digest ")
    assert "--corpus-mb 1) has digest" in data


def test_update_mode_resumes_bitwise_and_ends_identical(runs):
    full, [full_summary] = records(runs / "update-full.jsonl")
    part, summaries = records(runs / "update-part.jsonl")
    assert [r["step"] for r in part] == list(range(1, worker.STEPS + 1))
    for a, b in zip(full, part):
        assert (a["loss"], a["bytes_sent"]) == (b["loss"], b["bytes_sent"]), (a, b)
        if a["step"] > worker.STOP:  # the interrupted run also evaluates where it stopped
            assert a.get("val_loss") == b.get("val_loss"), (a, b)
    assert summaries[-1]["params_digest"] == full_summary["params_digest"]
    assert full_summary["mode"] == "update" and full_summary["local_steps"] == 2
    assert full_summary["optimizer"] == "local-adamw"
    hook = full_summary["hook"]
    assert hook["exchanges"] == worker.STEPS // 2 + 1 and hook["compressed_buckets"] > 0  # + the final flush
    exchanged = [r["bytes_sent"] for r in full if r["step"] > 4 and r["bytes_sent"]]  # after the dense warm-up
    assert exchanged and max(exchanged) < full_summary["dense_bytes_per_step"] / 5
    models = [torch.load(runs / "update-full" / f"rank{r}.pt", weights_only=False)["model"] for r in range(2)]
    resumed = [torch.load(runs / "update-resumed" / f"rank{r}.pt", weights_only=False)["model"] for r in range(2)]
    for name in models[0]:
        assert torch.equal(models[0][name], resumed[0][name]) and torch.equal(models[1][name], resumed[1][name])
    refused = (runs / "update-refused.txt").read_text()
    assert refused.startswith("deepreduce train: checkpoint used mode/local steps")


def test_classify_resumes_bitwise(runs):
    full, [full_summary] = records(runs / "classify-full.jsonl")
    part, summaries = records(runs / "classify-part.jsonl")
    assert [r["step"] for r in part] == [r["step"] for r in full] == list(range(1, worker.CLASSIFY_STEPS + 1))
    for a, b in zip(full, part):
        assert (a["loss"], a["bytes_sent"]) == (b["loss"], b["bytes_sent"]), (a, b)
        if a["step"] > worker.CLASSIFY_STOP and "val_loss" in a:
            assert (a["val_loss"], a["val_acc"]) == (b["val_loss"], b["val_acc"]), (a, b)
    assert [r["step"] for r in full if "val_acc" in r] == [3, 6, 8]
    assert all(0 <= r["val_acc"] <= 1 for r in full if "val_acc" in r)
    assert full_summary["task"] == "classify" and full_summary["val_acc"] == full[-1]["val_acc"]
    assert summaries[-1]["params_digest"] == full_summary["params_digest"]
    assert full_summary["hook"]["compressed_buckets"] > 0
    for rank in range(2):
        a = torch.load(runs / "classify-full" / f"rank{rank}.pt", weights_only=False)
        b = torch.load(runs / "classify-resumed" / f"rank{rank}.pt", weights_only=False)
        assert a["task"] == b["task"] == "classify"
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), name
        residuals_a, residuals_b = a["hook"]["memory"]["residuals"], b["hook"]["memory"]["residuals"]
        assert residuals_a and all(torch.equal(residuals_a[k], residuals_b[k]) for k in residuals_a)
    refused = (runs / "classify-refused.txt").read_text()
    assert refused == "deepreduce train: checkpoint is of --task classify, not lm"

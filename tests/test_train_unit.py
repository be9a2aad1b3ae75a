"""`deepreduce train` and `deepreduce demo` pieces that need no torchrun, and a demo smoke run."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from deepreduce import train


def test_learning_rate_schedule():
    args = argparse.Namespace(lr=1e-2, warmup=10, steps=110)
    assert train.learning_rate(0, args) == pytest.approx(1e-3)
    assert train.learning_rate(9, args) == pytest.approx(1e-2)
    assert train.learning_rate(10, args) == pytest.approx(1e-2)
    assert train.learning_rate(60, args) == pytest.approx(1e-2 * (0.1 + 0.45))
    assert train.learning_rate(110, args) == pytest.approx(1e-3)
    values = [train.learning_rate(s, args) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_comm_meter_merges_overlapping_intervals():
    meter = train.CommMeter(None)
    meter._intervals = [(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.5, 3.7)]
    meter._bytes = 10
    assert meter.take() == (10, 3.0)
    assert meter.take() == (0, 0.0)


def test_bad_compression_is_a_clear_error():
    with pytest.raises(SystemExit, match="--compression 'topk:0.01/nope/fp16'.*dense, fp16, powersgd"):
        train.make_hook(train.build_parser().parse_args(["--compression", "topk:0.01/nope/fp16"]))


def test_one_process_run_writes_metrics(tmp_path):
    """Without torchrun, `deepreduce train` runs as a world of one."""
    metrics = tmp_path / "m.jsonl"
    rc = subprocess.run(
        [sys.executable, "-m", "deepreduce", "train", "--d-model", "32", "--layers", "1", "--heads", "2",
         "--seq-len", "32", "--batch", "4", "--steps", "4", "--start-iter", "2", "--corpus-mb", "1",
         "--compression", "topk:0.1/rle/bf16", "--min-numel", "0", "--eval-every", "2", "--eval-batches", "1",
         "--metrics", str(metrics), "--quiet", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert rc.returncode == 0, rc.stderr[-3000:]
    lines = metrics.read_text().splitlines()
    assert len(lines) == 5 and '"summary"' in lines[-1] and '"world_size": 1' in lines[-1]


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    """The demo end to end with a tiny model: two torchrun runs and the table."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "deepreduce", "demo", "--steps", "6", "--out", str(tmp_path), "--",
         "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4",
         "--corpus-mb", "1", "--start-iter", "2", "--min-numel", "256", "--bucket-mb", "0.03", "--eval-batches", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "val loss" in out and "bytes/step" in out and "ratio" in out and "step time" in out
    assert "│ dense" in out and "topk:0.01/eliasfano/fp16" in out
    assert (tmp_path / "dense.jsonl").exists() and (tmp_path / "compressed.jsonl").exists()
    assert time.monotonic() - started < 240

"""Elastic restart: a worker killed with SIGKILL mid-run under `torchrun --max-restarts=1`;
the job restarts from the newest checkpoint every rank holds (hook state included) and
ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launching import worker_env
from workers import elastic
from workers.train_runs import TINY

pytestmark = pytest.mark.slow

STEPS, EVERY, KILL_AT = 24, 8, 13  # checkpoints at 8, 16, 24; the kill lands after the one at 8


def launch(out: Path, name: str, kill_at: int) -> subprocess.CompletedProcess:
    args = ["--compression", "topk:0.05/eliasfano/fp16", "--steps", str(STEPS), *TINY,
            "--checkpoint", str(out / name), "--checkpoint-every", str(EVERY), "--auto-resume",
            "--metrics", str(out / f"{name}.jsonl")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           elastic.__file__, str(kill_at), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=worker_env())


def test_killed_worker_restarts_from_the_last_checkpoint(tmp_path):
    whole = launch(tmp_path, "whole", 0)
    assert whole.returncode == 0, whole.stderr[-4000:]
    killed = launch(tmp_path, "killed", KILL_AT)
    assert killed.returncode == 0, killed.stderr[-4000:]
    assert "exitcode: -9" in killed.stderr  # torchrun saw the SIGKILL

    steps = [json.loads(line).get("step") for line in (tmp_path / "killed.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s is not None]
    # The first attempt logged the steps before the kill (records count from 1, the kill
    # hook from 0); the second resumed after the checkpoint of step 8.
    assert steps[:KILL_AT] == list(range(1, KILL_AT + 1)) and steps[KILL_AT:] == list(range(EVERY + 1, STEPS + 1))

    for rank in range(2):
        a = torch.load(tmp_path / "whole" / f"rank{rank}.pt", weights_only=False)
        b = torch.load(tmp_path / "killed" / f"rank{rank}.pt", weights_only=False)
        assert a["step"] == b["step"] == STEPS
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), name
        assert a["hook"]["step"] == b["hook"]["step"] == STEPS
        for key, residual in a["hook"]["memory"]["residuals"].items():
            assert torch.equal(residual, b["hook"]["memory"]["residuals"][key]), key
        # The previous generation is kept beside the newest.
        assert torch.load(tmp_path / "killed" / f"rank{rank}.prev.pt", weights_only=False)["step"] == STEPS - EVERY

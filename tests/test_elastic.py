"""A worker killed with SIGKILL mid-run. Under `torchrun --max-restarts=1` the job restarts
from the newest checkpoint every rank holds (hook state included) and ends bit for bit
where an uninterrupted run ends; without an agent the survivor fails on its own, clearly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launching import free_port, worker_env
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
    # The second attempt resumed after the checkpoint of step 8 and dropped the records the
    # first one wrote past it: every step once, in order.
    assert steps == list(range(1, STEPS + 1))
    assert f"--auto-resume: resuming from step {EVERY} of" in killed.stderr

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


def test_a_dead_peer_fails_the_survivor_with_a_clear_error(tmp_path):
    """No agent to restart anything: rank 1 dies in step KILL_AT + 1 (counting from 1),
    and rank 0 must leave on its own, well within --timeout, naming the step and its
    last checkpoint, with exit code 1 (no abort in gloo's teardown), the checkpoint
    intact. (Which collective fails first, DDP's or the hook's, depends on timing; the
    hook's own errors name the bucket too: tests/test_reliability.py.)"""
    port = free_port()
    args = ["--compression", "topk:0.05/eliasfano/fp16", "--steps", str(STEPS), *TINY, "--timeout", "60",
            "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", str(EVERY)]
    procs = []
    for rank in range(2):
        env = dict(worker_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, elastic.__file__, str(KILL_AT), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    began = time.monotonic()
    _, err = procs[0].communicate(timeout=300)
    elapsed = time.monotonic() - began
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1, err[-3000:]
    assert f"rank 0 failed in step {KILL_AT + 1} of {STEPS} (the last checkpoint is step {EVERY}" in err, err[-3000:]
    assert "Connection" in err or "CommunicationError" in err, err[-3000:]
    assert "terminate called" not in err and elapsed < 60
    saved = torch.load(tmp_path / "ckpt" / "rank0.pt", weights_only=False)
    assert saved["step"] == EVERY and saved["hook"]["step"] == EVERY

"""A link that goes down mid-run (two network namespaces, `ip link set eth0 down` on one
node and left down): both ranks must leave on their own within `--timeout`, with exit
code 1 and an error naming the failed step, no hang, no abort in gloo's teardown, and
their last checkpoints intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from deepreduce.apps.netns import NetnsCluster, netns_unavailable_reason
from workers.train_runs import TINY

REASON = netns_unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")]

TIMEOUT_S, EVERY = 20, 10


def test_a_link_that_goes_down_fails_every_rank_within_the_timeout(tmp_path):
    args = ["--compression", "topk:0.05/eliasfano/fp16", "--steps", "100000", *TINY, "--timeout", str(TIMEOUT_S),
            "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", str(EVERY), "--metrics", str(tmp_path / "m.jsonl")]
    with NetnsCluster(2, name=f"drl{os.getpid()}") as cluster:
        procs = [
            cluster.popen(node, [sys.executable, "-m", "deepreduce", "train", *args],
                          env={"RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node in range(2)
        ]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until a checkpoint exists and training is past it
            if (tmp_path / "m.jsonl").exists() and len((tmp_path / "m.jsonl").read_text().splitlines()) > EVERY + 3:
                break
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            time.sleep(0.2)
        subprocess.run(["ip", "-n", cluster.namespace(1), "link", "set", "eth0", "down"], check=True)
        cut = time.monotonic()
        outputs = [p.communicate(timeout=TIMEOUT_S + 90)[1] for p in procs]
        waited = time.monotonic() - cut
    codes = [p.returncode for p in procs]
    assert codes == [1, 1], [o[-2000:] for o in outputs]
    print(f"both ranks left {waited:.1f} s after the link went down (timeout {TIMEOUT_S} s)")
    assert waited < TIMEOUT_S + 60, waited
    for rank, err in enumerate(outputs):
        assert f"rank {rank} failed in step" in err and "the last checkpoint is step" in err, err[-2000:]
        assert "terminate called" not in err
        print(err.strip().splitlines()[-1][:300])
        saved = torch.load(tmp_path / "ckpt" / f"rank{rank}.pt", weights_only=False)
        assert saved["step"] % EVERY == 0 and saved["step"] >= EVERY
    steps = [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))

"""The README's update-mode example runs as written (one gloo rank), learns, and sends what
its comment says."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# Defines what the README's example leaves to the reader (model, batches, loss_fn, lr,
# lr_at, total_steps, evaluate), runs the example in a world of one gloo rank, and prints what it did.
HARNESS = textwrap.dedent("""
    import json, math, os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
    torch.manual_seed(0)
    teacher = torch.nn.Linear(128, 64)
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    inputs = torch.randn(4096, 128)
    targets = teacher(inputs).detach()
    batches = [(inputs[i:i + 32], targets[i:i + 32]) for i in range(0, 4096, 32)]
    loss_fn = torch.nn.functional.mse_loss
    lr = 3e-3
    total_steps = len(batches)
    def lr_at(step):  # a cosine schedule's rate (the example's optimizer keeps lr: the densities only follow it)
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total_steps)))
    evaluated = []
    def evaluate(model):
        with torch.no_grad():
            evaluated.append(loss_fn(model(inputs), targets).item())
    evaluate(model)
    exec(compile(sys.stdin.read(), "README.md", "exec"))
    evaluate(model)
    print(json.dumps({"before": evaluated[0], "after": evaluated[-1], "stats": sync.stats()}))
""")


def _update_mode_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    examples = [block for block in blocks if "dr.UpdateSync(" in block]
    assert examples, "README.md has no update-mode example"
    return examples[0]


def test_update_mode_example_runs_learns_and_sends_about_one_percent(tmp_path):
    example = _update_mode_example()
    assert "sync.finish()" in example and "sync.consensus()" in example
    with socket.socket() as probe:  # a free port for the one-rank group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "OMP_NUM_THREADS": "1"}
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    result = subprocess.run([sys.executable, str(harness)], input=example, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["after"] < 0.5 * out["before"], out
    stats = out["stats"]
    # The example's comment promises about 1 % of dense's bytes per step; over a run this
    # short, finish()'s one dense average of the model (counted in the stats) is set apart.
    dense_per_step = stats["dense_bytes"] / stats["steps"]
    exchanges = stats["sent_bytes"] - dense_per_step
    assert 0.007 < exchanges / stats["steps"] / dense_per_step < 0.013, stats

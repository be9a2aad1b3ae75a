"""Runs `deepreduce train` several times in one torchrun launch (tests/test_train_dist.py).

    torchrun --standalone --nproc_per_node=2 tests/workers/train_runs.py OUT_DIR

The process group is made here once, so train.main reuses it (and leaves it alone)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from deepreduce.apps import train
from deepreduce.cli import exit_distributed_process
from deepreduce.comm.torch_dist import close_process_group

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4",
        "--corpus-mb", "2", "--threads", "1", "--bucket-mb", "0.03", "--min-numel", "256",
        "--start-iter", "3", "--eval-every", "4", "--eval-batches", "2", "--log-every", "0", "--quiet"]
STEPS, STOP = 14, 7
CLASSIFY = ["--task", "classify", "--d-model", "16", "--layers", "2", "--seq-len", "64", "--batch", "4",
            "--corpus-mb", "1", "--threads", "1", "--bucket-mb", "0.01", "--min-numel", "256",
            "--start-iter", "2", "--eval-every", "3", "--eval-batches", "2", "--log-every", "0", "--quiet",
            "--compression", "topk:0.05/eliasfano/fp16", "--optimizer", "adamw"]
CLASSIFY_STEPS, CLASSIFY_STOP = 8, 4


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    spec = ["--compression", "topk:0.05/eliasfano/fp16", "--steps", str(STEPS)] + TINY
    # Uninterrupted, then interrupted after STOP steps and resumed.
    train.main(spec + ["--metrics", str(out / "full.jsonl"), "--checkpoint", str(out / "full")])
    train.main(spec + ["--metrics", str(out / "part.jsonl"), "--checkpoint", str(out / "part"), "--stop-after", str(STOP)])
    train.main(spec + ["--metrics", str(out / "part.jsonl"), "--checkpoint", str(out / "resumed"), "--resume", str(out / "part")])
    # A checkpoint refuses a run with another optimizer or other data (before any collective).
    refusals = []
    for other in (["--optimizer", "sgd"], ["--corpus-mb", "1"]):
        try:
            train.main(spec + other + ["--resume", str(out / "part")])
        except SystemExit as refused:
            refusals.append(str(refused))
    if dist.get_rank() == 0:
        (out / "refused.txt").write_text("\n".join(refusals))
    # Update mode with overlapped exchanges, an outer Nesterov step, LocalAdamW and the small
    # tensors compressed too: resumes bit for bit too.
    update = ["--compression", "topk:0.02/eliasfano/fp16", "--steps", str(STEPS), "--mode", "update", "--local-steps", "2",
              "--overlap", "--outer-lr", "0.8", "--outer-momentum", "0.5", "--nesterov", "--optimizer", "local-adamw",
              "--small-compression", "topk:1/strided/uniform:bits=4"] + TINY
    train.main(update + ["--metrics", str(out / "update-full.jsonl"), "--checkpoint", str(out / "update-full")])
    train.main(update + ["--metrics", str(out / "update-part.jsonl"), "--checkpoint", str(out / "update-part"),
                         "--stop-after", str(STOP)])
    train.main(update + ["--metrics", str(out / "update-part.jsonl"), "--checkpoint", str(out / "update-resumed"),
                         "--resume", str(out / "update-part")])
    try:
        train.main(update[:-len(TINY)] + ["--local-steps", "3"] + TINY + ["--resume", str(out / "update-part")])
    except SystemExit as refused:
        if dist.get_rank() == 0:
            (out / "update-refused.txt").write_text(str(refused))
    # The classification task resumes bit for bit too, and an LM run refuses its checkpoint.
    classify = CLASSIFY + ["--steps", str(CLASSIFY_STEPS)]
    train.main(classify + ["--metrics", str(out / "classify-full.jsonl"), "--checkpoint", str(out / "classify-full")])
    train.main(classify + ["--metrics", str(out / "classify-part.jsonl"), "--checkpoint", str(out / "classify-part"),
                           "--stop-after", str(CLASSIFY_STOP)])
    train.main(classify + ["--metrics", str(out / "classify-part.jsonl"), "--checkpoint", str(out / "classify-resumed"),
                           "--resume", str(out / "classify-part")])
    try:
        train.main(spec + ["--resume", str(out / "classify-part")])
    except SystemExit as refused:
        if dist.get_rank() == 0:
            (out / "classify-refused.txt").write_text(str(refused))
    # The built-in hooks, for comparison runs.
    for name in ("dense", "fp16", "powersgd"):
        rank = ["--powersgd-rank", "2"] if name == "powersgd" else []
        train.main(["--compression", name, "--steps", "6", *rank] + TINY
                   + ["--metrics", str(out / f"{name}.jsonl")])
    close_process_group()
    exit_distributed_process(0)  # skip gloo's teardown at exit, which can abort a finished run


if __name__ == "__main__":
    main()

"""Multi-process checks of the shared-index scheme through the DDP hook, run by
tests/test_shared_index.py on a bare gloo group (RANK, WORLD_SIZE, MASTER_PORT set):

    python shared_index.py OUT_DIR CHECK[,CHECK...]

Each rank writes OUT_DIR/rank<r>.json with one entry per check; the test compares the
ranks' entries. Several checks share one launch because starting processes costs seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import deepreduce as dr
from deepreduce.apps.train import _settle_buckets
from workers.hook_checks import SEQ, amp_runs, batches, digest, make_model, run_checks, train, train_from

STEPS = 50


def state(spec: str, **options) -> dr.DeepReduceState:
    options.setdefault("min_numel", 256)
    options.setdefault("stats_every", 0)
    return dr.DeepReduceState(None, spec, scheme="shared_index", **options)


def recording_hook(hook_state: dr.DeepReduceState, roots: list[list[int]]):
    """The deepreduce hook, noting every index broadcast as (step, bucket, root) as the
    transport saw it."""
    current = [None]

    def hook(s, bucket):
        if "broadcast_async" not in vars(s.transport):
            original = s.transport.broadcast_async

            def recording(payload, root):
                roots.append([s.step, current[0], root])
                return original(payload, root)

            s.transport.broadcast_async = recording
        current[0] = bucket.index()
        return dr.deepreduce_hook(s, bucket)

    return hook


TRAIN_RUNS = [
    ("topk:0.05/eliasfano/fp16", {}, "adam"),
    ("topk:0.05/eliasfano/fp16", {"momentum": 0.9, "clip_norm": 1.0, "density_warmup": 5}, "sgd"),
    ("topk:0.05/rle/bf16", {}, "adam"),
    ("randomk:0.05/raw/raw", {"granularity": "bucket"}, "adam"),
]


def train_run(spec: str, options: dict, opt: str) -> dict:
    """STEPS steps through the hook: the parameters' digest, losses, stats, and every
    index broadcast the engine's transport made."""
    model = make_model()
    initial = digest(model)
    hook_state = state(spec, **options)
    roots: list[list[int]] = []
    ddp = DDP(model, bucket_cap_mb=0.03)
    ddp.register_comm_hook(hook_state, recording_hook(hook_state, roots))
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2) if opt == "adam" else torch.optim.SGD(ddp.parameters(), lr=0.05)
    losses = []
    for x, y in batches(dist.get_rank(), STEPS):
        loss = torch.nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    groups = hook_state.engine._reduce_compressed.groups
    return {"digest": digest(model), "initial": initial, "losses": losses, "stats": hook_state.stats(), "roots": roots,
            "node_size": None if groups is None else groups.node_size}


def check_train(runs: int = len(TRAIN_RUNS)) -> dict:
    """50 steps of Adam (and SGD with the DGC recipe) through the hook: parameters must
    stay bitwise identical; every index broadcast must come from the documented leader."""
    return {f"{spec} {options}": train_run(spec, options, opt) for spec, options, opt in TRAIN_RUNS[:runs]}


def check_node_broadcast() -> dict:
    """The first training run again with torchrun's variables as on nodes of 2 processes:
    where 2 divides the world the leader's index message is relayed per node (the
    transport's own broadcast is never used) and the parameters are those of the plain
    broadcast; elsewhere the plain broadcast carries it."""
    rank = dist.get_rank()
    with mock.patch.dict(os.environ, LOCAL_WORLD_SIZE="2", GROUP_RANK=str(rank // 2), LOCAL_RANK=str(rank % 2)):
        spec, options, opt = TRAIN_RUNS[0]
        return {f"{spec} {options}": train_run(spec, options, opt)}


def check_equals_allreduce() -> dict:
    """Ratio 1, lossless fp32 values, no dense fallback: the same gradients as the
    built-in allreduce hook up to float rounding."""
    from workers.hook_checks import compare_with_allreduce

    return compare_with_allreduce(state("topk:1.0/raw/raw", dense_fallback=False))


def check_nonfinite() -> dict:
    """Rank 1's gradient turns Inf/NaN at steps where it leads some buckets and follows
    in others: every rank skips the same steps as plain DDP under AMP, the parameters
    stay identical and no residual takes the poison in."""
    return amp_runs(state, [("topk:0.05/eliasfano/fp16", {}),
                            ("topk:0.05/raw/raw", {"momentum": 0.9, "granularity": "bucket"})])


def check_nonfinite_raise() -> dict:
    from workers.hook_checks import nonfinite_raise_run

    return nonfinite_raise_run(state("topk:0.05/eliasfano/fp16", start_iter=2, nonfinite="raise"))


def check_resume() -> dict:
    """Save the hook state, model and optimizer after 7 steps, resume in a fresh DDP: the
    same parameters as the uninterrupted 14 steps (momentum correction on, so velocities
    travel too)."""
    def run(steps, saved=None):
        model = make_model()
        hook_state = state("topk:0.05/eliasfano/fp16", start_iter=2, momentum=0.9,
                           named_parameters=model.named_parameters())
        ddp = DDP(model, bucket_cap_mb=0.03)
        if saved is not None:
            # The leader is chosen per bucket: a resumed run settles DDP's bucket layout
            # first, as `deepreduce train` does, so its buckets are the uninterrupted run's.
            _settle_buckets(ddp, SEQ, torch.device("cpu"))
        ddp.register_comm_hook(hook_state, dr.deepreduce_hook)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        snapshot = train_from(model, ddp, hook_state, optimizer, list(batches(dist.get_rank(), 14)), steps, saved)
        return model, hook_state, snapshot

    whole, _, _ = run(14)
    _, _, saved = run(7)
    resumed, hook_state, _ = run(7, saved)
    return {"uninterrupted": digest(whole), "resumed": digest(resumed), "step": hook_state.step,
            "residuals": len(saved["hook"]["memory"]["residuals"])}


def check_mismatch() -> dict:
    """Rank 0 on the shared-index scheme, the others on the all-gather one: the
    configuration check fails on every rank, naming the scheme."""
    scheme = "shared_index" if dist.get_rank() == 0 else "allgather"
    model = make_model()
    try:
        train(model, dr.DeepReduceState(None, "topk:0.05/eliasfano/fp16", scheme=scheme, min_numel=256, stats_every=0),
              dr.deepreduce_hook, 1)
    except Exception as error:
        return {"raised": True, "message": f"{type(error).__name__}: {error}"}
    return {"raised": False, "message": ""}


CHECKS = {
    "train": check_train,
    "train_short": lambda: check_train(2),  # the first two runs: fp16 values, with and without DGC's recipe
    "node_broadcast": check_node_broadcast,
    "equals_allreduce": check_equals_allreduce,
    "nonfinite": check_nonfinite,
    "resume": check_resume,
    # These leave a DDP model in a failed state: last.
    "nonfinite_raise": check_nonfinite_raise,
    "mismatch": check_mismatch,
}


def main(out_dir: str, checks: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    run_checks(CHECKS, checks.split(","), Path(out_dir))


if __name__ == "__main__":
    main(*sys.argv[1:])

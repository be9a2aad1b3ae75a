"""Multi-process checks of ``scheme="hierarchical"`` through the DDP hook.

    torchrun --standalone --nproc_per_node=4 tests/workers/hierarchical_checks.py OUT_DIR --node-size 2
    torchrun --nnodes=2 --nproc_per_node=2 ... tests/workers/hierarchical_checks.py OUT_DIR   # LOCAL_WORLD_SIZE

Each rank writes OUT_DIR/rank<r>.json, one entry per check (as tests/workers/hook_checks.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepreduce as dr  # noqa: E402
from workers.hook_checks import batches, compare_with_allreduce, digest, make_model, run_checks, train  # noqa: E402

NODE_SIZE: int | None = None  # --node-size, else LOCAL_WORLD_SIZE
SCHEME: dict = {}  # the engine options under test (FLAT=1 in the environment: the flat scheme, to compare)
GRANULARITY = slice(None)  # --only tensor|bucket: one of the two bitwise runs


def state(spec: str, **kwargs) -> dr.DeepReduceState:
    kwargs.setdefault("min_numel", 256)
    kwargs.setdefault("stats_every", 0)
    return dr.DeepReduceState(None, spec, **SCHEME, **kwargs)


def check_bitwise() -> dict:
    """50 steps of Adam through the hook; parameters must be bitwise equal on every rank."""
    out = {}
    for spec, granularity in [("topk:0.05/eliasfano/fp16", "tensor"), ("topk:0.05/eliasfano/qsgd", "bucket")][GRANULARITY]:
        model = make_model()
        initial = digest(model)
        hook_state = state(spec, granularity=granularity)
        _, losses = train(model, hook_state, dr.deepreduce_hook, 50)
        out[f"{spec} {granularity}"] = {"digest": digest(model), "initial": initial, "stats": hook_state.stats(),
                                        "losses": losses, "residual_keys": sorted(map(str, hook_state.memory.residuals))}
    return out


def check_equals_allreduce() -> dict:
    """Ratio 1 with lossless codecs, no dense fallback, against torch's allreduce hook."""
    return {spec: compare_with_allreduce(state(spec, dense_fallback=False))
            for spec in ("topk:1.0/zstd/raw", "topk:1.0/eliasfano/zstd")}


def check_resume() -> dict:
    """Through the engine with a fixed layout whose slots cut segments: 10 steps,
    state_dict, 10 more in a fresh engine loaded from it; the same averages as 20 steps
    in one engine (residuals of cut pieces included)."""
    from deepreduce.comm.torch_dist import TorchTransport
    from deepreduce.engine import Engine, Segment

    sizes = [3000, 1500, 700, 5001]  # 10201 elements: slots of ceil(10201 / L), the last one padded
    segments, offset = [], 0
    for i, n in enumerate(sizes):
        segments.append(Segment(f"w{i}", offset, n))
        offset += n
    gen = torch.Generator().manual_seed(77 + dist.get_rank())
    grads = [torch.randn(offset, generator=gen) for _ in range(20)]

    def engine() -> Engine:
        return Engine(TorchTransport(), dr.Compressor.from_spec("topk:0.02/eliasfano/fp16"), min_numel=256, **SCHEME)

    def run(eng: Engine, steps) -> list[torch.Tensor]:
        out = []
        for g in steps:
            out.append(eng.reduce(g.clone(), segments, key=0).wait().clone())
            eng.end_step()
        return out

    straight = run(engine(), grads)
    first = engine()
    head = run(first, grads[:10])
    saved = first.state_dict()
    second = engine()
    second.load_state_dict(saved)
    tail = run(second, grads[10:])
    same = all(torch.equal(a, b) for a, b in zip(straight, head + tail))
    total = torch.stack(straight).sum(0)
    return {"same": same, "digest": hashlib.sha256(total.numpy().tobytes()).hexdigest(),
            "saved_keys": sorted(map(str, saved["memory"]["residuals"]))}


def check_nonfinite() -> dict:
    """One rank's gradient turns NaN at step 5: every rank's averaged bucket is non-finite
    there (as allreduce), every rank skips that step alike (GradScaler-style)."""
    model = make_model()
    hook_state = state("topk:0.05/eliasfano/fp16")
    ddp = DDP(model, bucket_cap_mb=0.03)
    ddp.register_comm_hook(hook_state, dr.deepreduce_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-2)
    skipped = []
    for step, (x, y) in enumerate(batches(dist.get_rank(), 10)):
        loss = torch.nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1))
        if step == 5 and dist.get_rank() == dist.get_world_size() - 1:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        if finite:
            optimizer.step()
        else:
            skipped.append(step)
    return {"digest": digest(model), "skipped": skipped, "stats": hook_state.stats()}


def check_shared_between_nodes() -> dict:
    """scheme="hierarchical_shared_index": 50 steps of Adam bitwise equal on every rank,
    and ratio 1 lossless equal to torch's allreduce hook."""
    shared = {**SCHEME, "scheme": "hierarchical_shared_index"}
    model = make_model()
    hook_state = dr.DeepReduceState(None, "topk:0.05/eliasfano/fp16", min_numel=256, stats_every=0, **shared)
    _, losses = train(model, hook_state, dr.deepreduce_hook, 50)
    exact = dr.DeepReduceState(None, "topk:1.0/eliasfano/raw", min_numel=256, stats_every=0, dense_fallback=False,
                               **shared)
    return {"bitwise": {"digest": digest(model), "stats": hook_state.stats(), "losses": losses},
            "equals_allreduce": compare_with_allreduce(exact)}


CHECKS = {"bitwise": check_bitwise, "equals_allreduce": check_equals_allreduce, "resume": check_resume,
          "nonfinite": check_nonfinite, "shared_between_nodes": check_shared_between_nodes}


def main() -> None:
    global NODE_SIZE, GRANULARITY
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--node-size", type=int, default=None)
    parser.add_argument("--only", choices=("tensor", "bucket"), default=None, help="bitwise: only this granularity")
    args = parser.parse_args()
    NODE_SIZE = args.node_size
    if args.only:
        GRANULARITY = slice(0, 1) if args.only == "tensor" else slice(1, 2)
    SCHEME.update({"scheme": "hierarchical", "node_size": NODE_SIZE} if not os.environ.get("FLAT") else {})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run_checks(CHECKS, args.checks.split(","), args.out_dir,
               {"_env": {k: os.environ.get(k) for k in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK")}})


if __name__ == "__main__":
    main()

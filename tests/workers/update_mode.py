"""gloo worker for the update mode: ``update_mode.py OUT_DIR``. Each rank trains a small
model with its own optimizer on its own data under several UpdateSync settings and saves
parameter digests, resume checks and a dense reference to OUT_DIR/rank<r>.pt."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import deepreduce as dr
from deepreduce.cli import exit_distributed_process
from deepreduce.comm.torch_dist import close_process_group

CONFIGS = {
    # name: (spec, UpdateSync options, optimizer)
    "lossless-h1": ("topk:0.05/eliasfano/raw", {"local_steps": 1}, "adamw"),
    "lossy-h1": ("topk:0.02/eliasfano/qsgd:bits=4", {"local_steps": 1}, "adamw"),
    "lossless-h4": ("topk:0.05/zstd/raw", {"local_steps": 4}, "sgd"),
    "lossy-h4-outer": ("randomk:0.02/rle/fp16", {"local_steps": 4, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}, "adamw"),
    "lossy-h2-overlap": ("topk:0.02/eliasfano/fp16", {"local_steps": 2, "overlap": True}, "adamw"),
    "lossy-h2-keep": ("topk:0.02/eliasfano/uniform:bits=3", {"local_steps": 2, "keep_unsent": True}, "sgd"),
    "lossy-h1-keep-ahead": ("topk:0.03/eliasfano/uniform:bits=1,scale=bf16",
                            {"local_steps": 1, "keep_unsent": True, "unsent_scale": 1.5}, "adamw"),
    # One block top-k over the large tensors, the 4-element bias through the small compressor.
    "blocks-bucket-small": ("blocktopk:0.1,block=16/blocks:block=16/uniform:bits=1,scale=bf16",
                            {"local_steps": 1, "keep_unsent": True, "unsent_scale": 1.5, "granularity": "bucket",
                             "small_compressor": "cyclic:0.25/strided/fp16"}, "adamw"),
}
STEPS = 12


def make_model(rank: int) -> torch.nn.Module:
    torch.manual_seed(100 + rank)  # different on every rank: UpdateSync must broadcast rank 0's
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 32, generator=gen)
    return x, torch.tanh(x[:, :4] * 2)


def digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def train(rank: int, name: str, steps: range, model=None, optimizer=None, sync=None, ddp: bool = False):
    spec, options, kind = CONFIGS[name]
    forward = model
    if model is None:
        model = make_model(rank)
        optimizer = make_optimizer(kind, model)
        forward = DDP(model) if ddp else model  # DDP broadcasts rank 0's parameters itself
        sync = dr.UpdateSync(model.named_parameters(), spec, min_numel=64, ddp=forward if ddp else None, **options)
    losses = []
    for step in steps:
        x, y = batch(rank, step)
        loss = torch.nn.functional.mse_loss(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.step()
        losses.append(loss.item())
    return model, optimizer, sync, losses


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict = {}
    for name in CONFIGS:
        model, optimizer, sync, losses = train(rank, name, range(STEPS))
        sync.finish()
        entry = {"digest": digest(model), "losses": losses, "stats": sync.stats()}
        # resume: half the steps, save, rebuild everything from the checkpoint, the other half
        first = train(rank, name, range(STEPS // 2))
        saved = {"model": {k: v.clone() for k, v in first[0].state_dict().items()},
                 "optimizer": first[1].state_dict(), "sync": first[2].state_dict()}
        model2 = make_model(rank)
        optimizer2 = make_optimizer(CONFIGS[name][2], model2)
        sync2 = dr.UpdateSync(model2.named_parameters(), CONFIGS[name][0], min_numel=64, broadcast=False, **CONFIGS[name][1])
        model2.load_state_dict(saved["model"])
        optimizer2.load_state_dict(saved["optimizer"])
        sync2.load_state_dict(saved["sync"])
        resumed = train(rank, name, range(STEPS // 2, STEPS), model2, optimizer2, sync2)
        resumed[2].finish()
        entry["resumed_digest"] = digest(resumed[0])
        results[name] = entry
    # under DDP with the local hook: the same result as without DDP
    model, _, sync, _ = train(rank, "lossy-h1", range(STEPS), ddp=True)
    results["ddp"] = {"digest": digest(model), "stats": sync.stats()}
    # ratio 1, lossless, H = 1 against per-rank optimizers whose parameters are averaged densely
    spec = "topk:1.0/raw/raw"
    model = make_model(rank)
    optimizer = make_optimizer("adamw", model)
    sync = dr.UpdateSync(model.named_parameters(), spec, min_numel=0, dense_fallback=False)
    reference = make_model(0)
    ref_optimizer = make_optimizer("adamw", reference)
    world = dist.get_world_size()
    diffs = []
    for step in range(STEPS):
        x, y = batch(rank, step)
        for m, opt in ((model, optimizer), (reference, ref_optimizer)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        sync.step()
        with torch.no_grad():
            for p in reference.parameters():
                dist.all_reduce(p)
                p.div_(world)
        diffs.append(max(float((a - b).abs().max()) for a, b in zip(model.parameters(), reference.parameters())))
    results["equals_dense"] = {"diffs": diffs, "stats": sync.stats()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    close_process_group()
    exit_distributed_process(0)  # skip gloo's teardown at exit, which can abort a finished run


if __name__ == "__main__":
    main(*sys.argv[1:])

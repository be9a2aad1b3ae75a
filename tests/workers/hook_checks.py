"""Multi-process checks of the DDP comm hook, run under torchrun by tests/test_hook_dist.py.

    torchrun --standalone --nproc_per_node=2 tests/workers/hook_checks.py OUT_DIR [--checks a,b] [--backend nccl] [--device cuda]

Each rank writes OUT_DIR/rank<r>.json with one entry per check; the test compares the
ranks' entries (e.g. parameter digests must be equal). Several checks share one launch
because starting torchrun costs seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import deepreduce as dr
from deepreduce.cli import exit_distributed_process
from deepreduce.comm.torch_dist import close_process_group
from deepreduce.apps.models import ByteTransformer

# Compressor specs whose training must keep parameters bitwise identical on all ranks.
# A spec is tested when its codecs are registered; add new codecs here.
SPECS = [
    "topk:0.05/eliasfano/fp16",
    "topk:0.05/zstd/raw",
    "topk:0.05/rle/bf16",
    "randomk:0.05/raw/zstd",
    "threshold:t=2e-3/eliasfano/fp16",  # k differs between ranks: exercises the padding
    "topk:0.05/bloom:fpr=1e-3,policy=p2/polyfit",
    "topk:0.05/eliasfano/qsgd",
    "topk:0.05/bloom:fpr=1e-2,policy=random/qsgd",
    "topk:0.05/eliasfano/polyfit",
    "topk:0.05/eliasfano/dexp",
    "cyclic:0.1/strided/uniform:bits=2",
    "topk:0.05/eliasfano/uniform:bits=1",
]


def available(spec: str) -> bool:
    """Whether every codec a spec names is registered in this build."""
    _, index, value = spec.split("/")
    return index.split(":")[0] in dr.index_codecs() and value.split(":")[0] in dr.value_codecs()


STEPS = 50
SEQ = 32
DEVICE = torch.device("cpu")  # the local GPU under --device cuda (or --backend nccl)


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(1234)  # same initial parameters on every rank
    return ByteTransformer(d_model=32, n_layers=1, n_heads=2, seq_len=SEQ).to(DEVICE, dtype)


def batches(rank: int, steps: int):
    """Different data on every rank, so a wrong average shows as diverging parameters."""
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        window = torch.randint(0, 256, (4, SEQ + 1), generator=gen).to(DEVICE)
        yield window[:, :-1], window[:, 1:]


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def train(model: torch.nn.Module, state, hook, steps: int, opt: str = "adam", lr: float = 1e-2, bucket_mb: float = 0.03):
    ddp = DDP(model, bucket_cap_mb=bucket_mb)
    ddp.register_comm_hook(state, hook)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=lr) if opt == "adam" else torch.optim.SGD(ddp.parameters(), lr=lr)
    losses = []
    for x, y in batches(dist.get_rank(), steps):
        logits = ddp(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return ddp, losses


def hook_state(spec: str, **kwargs) -> dr.DeepReduceState:
    kwargs.setdefault("min_numel", 256)
    kwargs.setdefault("stats_every", 0)
    return dr.DeepReduceState(None, spec, **kwargs)


# --- checks ----------------------------------------------------------------------------


def check_specs() -> dict:
    out = {}
    for spec in SPECS:
        if not available(spec):
            continue
        model = make_model()
        initial = digest(model)
        state = hook_state(spec)
        _, losses = train(model, state, dr.deepreduce_hook, STEPS)
        out[spec] = {"digest": digest(model), "initial": initial, "stats": state.stats(), "losses": losses}
    return out


PRESIZED_SPECS = [("topk:0.05/eliasfano/fp16", {}), ("topk:0.05/eliasfano/uniform:bits=4", {}),
                  ("randomk:0.05/raw/qsgd", {}), ("topk:0.05/eliasfano/fp16", {"granularity": "bucket", "momentum": 0.9})]


def check_presized() -> dict:
    """Computed message sizes (no size exchange) against exchanged ones: the same parameters."""
    out = {}
    for spec, options in PRESIZED_SPECS:
        for exchange in ("auto", "always"):
            model = make_model()
            state = hook_state(spec, size_exchange=exchange, **options)
            train(model, state, dr.deepreduce_hook, 12)
            out[f"{spec} {options} {exchange}"] = {"digest": digest(model), "stats": state.stats()}
    return out


def check_bucket_granularity() -> dict:
    """One top-k per bucket instead of per parameter (a lossless and a lossy spec)."""
    out = {}
    for spec in ("topk:0.05/eliasfano/fp16", "randomk:0.05/raw/qsgd"):
        model = make_model()
        state = hook_state(spec, granularity="bucket")
        _, losses = train(model, state, dr.deepreduce_hook, 20)
        out[spec] = {"digest": digest(model), "stats": state.stats(), "losses": losses}
    return out


def check_dtypes() -> dict:
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        model = make_model(dtype)
        state = hook_state("topk:0.05/eliasfano/fp16")
        _, losses = train(model, state, dr.deepreduce_hook, 20, opt="sgd", lr=0.05)
        out[str(dtype)] = {"digest": digest(model), "stats": state.stats(), "losses": losses}
    return out


def check_equals_allreduce() -> dict:
    """Ratio 1.0 with lossless codecs, gather forced (no dense fallback), against the
    built-in allreduce hook: same gradients and parameters up to float rounding."""
    return {spec: compare_with_allreduce(hook_state(spec, dense_fallback=False))
            for spec in ("topk:1.0/zstd/raw", "topk:1.0/eliasfano/zstd")}


def compare_with_allreduce(state) -> dict:
    """12 SGD steps through ``state``'s hook and through the built-in allreduce hook from
    the same model: the largest gradient and parameter differences, and the gradient scale."""
    ours, reference = make_model(), make_model()
    ddp_ours = DDP(ours, bucket_cap_mb=0.03)
    ddp_ours.register_comm_hook(state, dr.deepreduce_hook)
    ddp_ref = DDP(reference, bucket_cap_mb=0.03)
    ddp_ref.register_comm_hook(None, default_hooks.allreduce_hook)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05)
    grad_diff, grad_scale = 0.0, 0.0
    for x, y in batches(dist.get_rank(), 12):
        for ddp, opt in ((ddp_ours, opt_ours), (ddp_ref, opt_ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1)).backward()
        for a, b in zip(ours.parameters(), reference.parameters()):
            grad_diff = max(grad_diff, float((a.grad - b.grad).abs().max()))
            grad_scale = max(grad_scale, float(b.grad.abs().max()))
        opt_ours.step()
        opt_ref.step()
    param_diff = max(float((a - b).abs().max()) for a, b in zip(ours.parameters(), reference.parameters()))
    return {"grad_diff": grad_diff, "grad_scale": grad_scale, "param_diff": param_diff, "digest": digest(ours),
            "stats": state.stats()}


def check_fallback() -> dict:
    """A density where the all-gather would move more than an allreduce: every bucket
    must go dense, on every rank alike."""
    model = make_model()
    state = hook_state("topk:0.7/raw/raw")
    _, losses = train(model, state, dr.deepreduce_hook, 10)
    return {"digest": digest(model), "stats": state.stats()}


def check_mismatch() -> dict:
    """Ranks with different compressors must all fail with a message naming both."""
    spec = "topk:0.05/eliasfano/fp16" if dist.get_rank() == 0 else "topk:0.1/eliasfano/fp16"
    model = make_model()
    try:
        train(model, hook_state(spec), dr.deepreduce_hook, 1)
    except Exception as error:  # DDP may wrap the hook's exception
        return {"raised": True, "message": f"{type(error).__name__}: {error}"}
    return {"raised": False, "message": ""}


def check_encode_failure() -> dict:
    """One rank's compressor fails: every rank raises (no rank waits for it forever)."""
    model = make_model()
    state = hook_state("topk:0.05/eliasfano/fp16")
    if dist.get_rank() == 1:
        encode = state.compressor.compress_detailed

        def failing(tensor, *, step=None, key=0, **options):
            if step == 3:
                raise RuntimeError("injected encode failure")
            return encode(tensor, step=step, key=key, **options)

        state.compressor.compress_detailed = failing
    try:
        train(model, state, dr.deepreduce_hook, 5)
    except Exception as error:
        return {"raised": True, "message": f"{type(error).__name__}: {error}", "step": state.step}
    return {"raised": False, "message": "", "step": state.step}


# --- non-finite gradients, resume into another bucket layout ----------------------------------

POISONED = {4: float("inf"), 9: -float("inf"), 12: float("nan")}  # step -> what rank 1's gradient gets


def poison(model: torch.nn.Module, steps: dict[int, float], counter: list[int]) -> list[int]:
    """On rank 1, put ``steps[step]`` into two elements of the head's gradient (before DDP
    sees it); returns the flat positions poisoned."""
    positions = [3, 700]
    if dist.get_rank() == 1:
        def hook(grad):
            if counter[0] in steps:
                grad = grad.clone()
                grad.view(-1)[positions] = steps[counter[0]]
            return grad

        model.head.weight.register_hook(hook)
    return positions


def amp_run(hook, state, steps: int = 16) -> dict:
    """SGD with AMP's GradScaler (growth every 3 steps) and poisoned gradients."""
    model = make_model()
    counter = [0]
    poison(model, POISONED, counter)
    ddp = DDP(model, bucket_cap_mb=0.03)
    ddp.register_comm_hook(state, hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, growth_interval=3)
    scales, skipped = [], []
    for step, (x, y) in enumerate(batches(dist.get_rank(), steps)):
        counter[0] = step
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x).float().reshape(-1, 256), y.reshape(-1))
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(scaler.get_scale() < before)
    return {"digest": digest(model), "scales": scales, "skipped": [i for i, s in enumerate(skipped) if s]}


def residuals_finite(state: dr.DeepReduceState) -> bool:
    memory = state.memory
    return all(bool(torch.isfinite(t).all()) for table in (memory.residuals, memory.velocities) for t in table.values())


def check_nonfinite_amp() -> dict:
    """The same skipped steps and scale schedule as plain DDP, no poisoned residual."""
    return amp_runs(hook_state, [("topk:0.05/eliasfano/fp16", {}), ("mstopk:0.05/eliasfano/qsgd", {}),
                                 ("topk:0.05/eliasfano/fp16", {"momentum": 0.9, "granularity": "bucket"})])


def amp_runs(make_state, configs: list[tuple[str, dict]]) -> dict:
    """:func:`amp_run` through torch's allreduce hook, then through the deepreduce hook with
    ``make_state(spec, start_iter=2, **options)`` for each ``(spec, options)``."""
    out = {"allreduce": amp_run(default_hooks.allreduce_hook, None)}
    for spec, options in configs:
        state = make_state(spec, start_iter=2, **options)
        run = amp_run(dr.deepreduce_hook, state)
        run.update(residuals_finite=residuals_finite(state), stats=state.stats())
        out[f"{spec} {options}"] = run
    return out


def check_nonfinite_fp16() -> dict:
    """fp16 buckets, no scaler: the averaged gradient is non-finite exactly where plain
    allreduce's is; the step is skipped as AMP would; training goes on."""
    out = {}
    for name, hook, state in (("allreduce", default_hooks.allreduce_hook, None),
                              ("deepreduce", dr.deepreduce_hook, hook_state("topk:0.05/eliasfano/fp16", start_iter=2))):
        model = make_model(torch.float16)
        counter = [0]
        poison(model, {5: float("nan")}, counter)
        ddp = DDP(model, bucket_cap_mb=0.03)
        ddp.register_comm_hook(state, hook)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        nonfinite = {}
        for step, (x, y) in enumerate(batches(dist.get_rank(), 10)):
            counter[0] = step
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x).float().reshape(-1, 256), y.reshape(-1)).backward()
            bad = {n: torch.nonzero(~torch.isfinite(p.grad.reshape(-1))).reshape(-1).tolist()
                   for n, p in model.named_parameters() if not bool(torch.isfinite(p.grad).all())}
            if bad:
                nonfinite[step] = bad
                continue  # skipped, as a scaler would
            optimizer.step()
        out[name] = {"digest": digest(model), "nonfinite": nonfinite}
        if state is not None:
            out[name].update(residuals_finite=residuals_finite(state), stats=state.stats())
    return out


def check_nonfinite_raise() -> dict:
    return nonfinite_raise_run(hook_state("topk:0.05/eliasfano/fp16", start_iter=2, nonfinite="raise"))


def nonfinite_raise_run(state) -> dict:
    """Train with a NaN gradient at step 4 under a ``nonfinite="raise"`` hook state: whether
    and where it raised, and the message."""
    model = make_model()
    counter = [0]
    poison(model, {4: float("nan")}, counter)
    ddp = DDP(model, bucket_cap_mb=0.03)
    ddp.register_comm_hook(state, dr.deepreduce_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    try:
        for step, (x, y) in enumerate(batches(dist.get_rank(), 8)):
            counter[0] = step
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1)).backward()
            optimizer.step()
    except Exception as error:  # DDP may wrap the hook's exception
        return {"raised": True, "message": f"{type(error).__name__}: {error}", "step": counter[0]}
    return {"raised": False, "message": "", "step": counter[0]}


def train_from(model, ddp, state, optimizer, data: list, steps: int, saved: dict | None = None) -> dict:
    """``steps`` steps of ``data`` through ``ddp``, from the start or from a ``saved``
    snapshot; the snapshot after them (model, optimizer, hook state, step)."""
    first = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.load_state_dict(saved["hook"])
        first = saved["step"]
    for x, y in data[first:first + steps]:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1)).backward()
        optimizer.step()
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "hook": state.state_dict(), "step": first + steps}


def check_resume_layout() -> dict:
    """Save after 6 steps, resume into a DDP with another bucket size and no settling
    pass (its first iteration uses yet another layout): per-parameter residuals make the
    resumed run equal the uninterrupted one (granularity "tensor"); with one top-k per
    bucket every parameter's residual is carried over."""
    out = {}
    for granularity in ("tensor", "bucket"):
        def run(steps, bucket_mb, saved=None):
            model = make_model()
            state = hook_state("topk:0.05/eliasfano/fp16", start_iter=2, granularity=granularity,
                               named_parameters=model.named_parameters())
            ddp = DDP(model, bucket_cap_mb=bucket_mb)
            ddp.register_comm_hook(state, dr.deepreduce_hook)
            optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
            snapshot = train_from(model, ddp, state, optimizer, list(batches(dist.get_rank(), 12)), steps, saved)
            return model, state, snapshot

        whole, _, _ = run(12, 0.03)
        _, _, saved = run(6, 0.03)
        resumed, state, end = run(6, 0.01, saved)
        out[granularity] = {
            "uninterrupted": digest(whole), "resumed": digest(resumed),
            "saved_residuals": sorted(saved["hook"]["memory"]["residuals"]),
            "end_residuals": sorted(end["hook"]["memory"]["residuals"]),
            "residuals_finite": residuals_finite(state),
        }
    return out


def check_auto() -> dict:
    """compressor="auto": with the link measured, and with a slow link given and a
    re-plan at every drift check; parameters and plans must agree across ranks; a run
    resumed from step 12 equals the uninterrupted one."""
    out = {}

    def run(plan_options, steps, saved=None):
        model = make_model()
        plan = dr.AutoPlan(["topk:0.2/eliasfano/fp16", "topk:0.05/eliasfano/fp16"], **plan_options)
        state = hook_state(plan, start_iter=2, named_parameters=model.named_parameters())
        ddp = DDP(model, bucket_cap_mb=0.03)
        ddp.register_comm_hook(state, dr.deepreduce_hook)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        snapshot = train_from(model, ddp, state, optimizer, list(batches(dist.get_rank(), 24)), steps, saved)
        stats = state.stats()
        return {"digest": digest(model), "plan": stats["plan"]["buckets"], "replans": stats["plan"]["replans"],
                "planned_at": stats["plan"]["planned_at"],
                "compressed_buckets": stats["compressed_buckets"],
                "planned_dense_buckets": stats["planned_dense_buckets"]}, snapshot

    out["measured"], _ = run({"check_every": 0}, 16)
    # Drift checks every 4 steps; the first one after the baseline (7 step times after the
    # plan) compares it with itself, the ones after it re-plan (drift 1e-9).
    slow = {"link": (0.001, 1e5), "check_every": 4, "drift": 1e-9}
    out["slow"], _ = run(slow, 24)
    out["fast"], _ = run({"link": (0.0, 1e13), "check_every": 0}, 8)
    _, saved = run(slow, 12)
    out["resumed"], _ = run(slow, 12, saved)
    return out


CHECKS = {
    "specs": check_specs,
    "auto": check_auto,
    "bucket": check_bucket_granularity,
    "dtypes": check_dtypes,
    "equals_allreduce": check_equals_allreduce,
    "fallback": check_fallback,
    "nonfinite_amp": check_nonfinite_amp,
    "nonfinite_fp16": check_nonfinite_fp16,
    "resume_layout": check_resume_layout,
    # These leave a DDP model in a failed state: last.
    "nonfinite_raise": check_nonfinite_raise,
    "encode_failure": check_encode_failure,
    "presized": check_presized,
    "mismatch": check_mismatch,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="where model and data live (nccl: cuda)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if (args.device or ("cuda" if args.backend == "nccl" else "cpu")) == "cuda":
        global DEVICE
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(args.backend)
    run_checks(CHECKS, args.checks.split(","), args.out_dir)


def run_checks(checks: dict, names: list[str], out_dir: Path, extra: dict | None = None) -> None:
    """Run the named ``checks`` in order (stopping at the first that raises: the process
    group may be unusable after it), write this rank's results (plus ``extra``) to
    ``out_dir/rank<r>.json``, close the process group and end the process."""
    results: dict = {"_seconds": {}, **(extra or {})}
    for name in names:
        began = time.perf_counter()
        try:
            results[name] = checks[name]()
            results["_seconds"][name] = round(time.perf_counter() - began, 2)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            break
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    close_process_group(completed=not any("error" in entry for entry in results.values()))
    exit_distributed_process(0)  # skip gloo's teardown at exit, which can abort a finished run


if __name__ == "__main__":
    main()

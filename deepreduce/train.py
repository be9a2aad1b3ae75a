"""``deepreduce train``: a byte-level transformer LM on the standard library's source text,
with DDP and a choice of gradient communication. Launched by torchrun::

    torchrun --standalone --nproc_per_node=2 -m deepreduce train --compression topk:0.01/eliasfano/fp16
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        -m deepreduce train --steps 1000 --metrics run.jsonl

Without torchrun it trains in one process (world size 1). ``--compression`` takes a
compressor spec (``deepreduce codecs`` lists the parts) or one of the built-in torch
hooks for comparison: ``dense`` (allreduce), ``fp16`` (fp16_compress_hook) and
``powersgd`` (powerSGD_hook, wrapped so each bucket's future completes before the hook
returns: the stock hook issues collectives from callbacks, which breaks gloo).

Metrics: one JSON object per line (rank 0 writes them): ``step``, ``loss`` (rank 0's
training loss), ``val_loss`` (on evaluation steps), ``lr``, ``bytes_sent`` (bytes this
rank handed to collectives in the step), ``step_s`` and ``comm_s`` (time with a bucket's
reduction in flight, from the hook call to its result, merged over buckets: it includes
the hook's own encode/decode time and overlaps the backward pass). The last line has
``"summary"``.

Checkpoints (``--checkpoint DIR``) hold, per rank, the model, optimizer, hook state
(error-feedback residuals, step, stats), the data stream and RNG state; ``--resume DIR``
continues so that the following steps equal an uninterrupted run bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from .comm.torch_dist import close_process_group
from .compressor import Compressor
from .data import stdlib_corpus
from .errors import ConfigError
from .hooks import DeepReduceState, completed_before_return, deepreduce_hook
from .models import ByteTransformer

logger = logging.getLogger("deepreduce.train")

BUILTIN_HOOKS = ("dense", "fp16", "powersgd")
_CHECKPOINT_FORMAT = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepreduce train",
        description="Train a byte-level transformer LM on the standard library's source text with DDP "
                    "(launch with torchrun; without it, one process). --compression picks the gradient "
                    "communication: a compressor spec or a built-in torch hook.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=128, help="embedding width")
    m.add_argument("--layers", type=int, default=2, help="transformer blocks")
    m.add_argument("--heads", type=int, default=4, help="attention heads (must divide --d-model)")
    m.add_argument("--seq-len", type=int, default=128, help="context length in bytes")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=300, help="total steps (sets the learning-rate schedule)")
    t.add_argument("--stop-after", type=int, default=None, help="stop after this step (e.g. to resume later)")
    t.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (Adam)")
    t.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine decay to lr/10")
    t.add_argument("--seed", type=int, default=0, help="model init, data order and compressor streams")
    t.add_argument("--corpus-mb", type=float, default=16, help="megabytes of stdlib source to load")
    t.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's choice)")
    c = p.add_argument_group("communication")
    c.add_argument("--compression", default="dense",
                   help="a compressor spec such as topk:0.01/eliasfano/fp16, or dense | fp16 | powersgd")
    c.add_argument("--start-iter", type=int, default=10, help="dense steps before compression starts (>= 2)")
    c.add_argument("--min-numel", type=int, default=1024, help="buckets smaller than this go dense")
    c.add_argument("--no-error-feedback", action="store_true")
    c.add_argument("--no-dense-fallback", action="store_true")
    c.add_argument("--powersgd-rank", type=int, default=4)
    c.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket cap")
    c.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    o = p.add_argument_group("output")
    o.add_argument("--metrics", type=Path, default=None, help="JSON-lines metrics file (rank 0)")
    o.add_argument("--eval-every", type=int, default=50)
    o.add_argument("--eval-batches", type=int, default=8)
    o.add_argument("--log-every", type=int, default=25, help="console line every N steps (0: none)")
    o.add_argument("--checkpoint", type=Path, default=None, help="directory for checkpoints (one file per rank)")
    o.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    o.add_argument("--resume", type=Path, default=None, help="checkpoint directory to continue from")
    o.add_argument("--quiet", action="store_true")
    return p


# --- process group -----------------------------------------------------------------------


def _init_distributed(backend: str) -> tuple[bool, torch.device]:
    """Join torchrun's group (or a one-process group). Returns (created, device)."""
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    if use_cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if dist.is_initialized():
        return False, device
    chosen = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(chosen)
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="deepreduce-store-"), 1)
        dist.init_process_group(chosen, store=store, rank=0, world_size=1)
    return True, device


# --- communication hooks and their accounting ---------------------------------------------


class CommMeter:
    """Wraps any comm hook to measure, per step, the bytes it sent and the time with a
    reduction in flight (merged intervals from hook call to result)."""

    def __init__(self, bytes_of: Callable[[Any, dist.GradBucket], int] | None) -> None:
        self._bytes_of = bytes_of
        self._lock = threading.Lock()
        self._intervals: list[tuple[float, float]] = []
        self._bytes = 0

    def wrap(self, hook: Callable) -> Callable:
        meter = self

        # No annotations: DDP compares them with the real classes, and this module's
        # annotations are strings (from __future__ import annotations).
        def timed_hook(state, bucket):
            started = time.perf_counter()
            if meter._bytes_of is not None:
                meter._bytes += meter._bytes_of(state, bucket)
            future = hook(state, bucket)

            def finished(done: torch.futures.Future) -> torch.Tensor:
                value = done.value()
                with meter._lock:
                    meter._intervals.append((started, time.perf_counter()))
                return value

            return future.then(finished)

        return timed_hook

    def take(self) -> tuple[int, float]:
        """(bytes, seconds in flight) since the last call."""
        with self._lock:
            intervals, self._intervals = sorted(self._intervals), []
        total, end = 0.0, -math.inf
        for a, b in intervals:
            if b > end:
                total += b - max(a, end)
                end = b
        sent, self._bytes = self._bytes, 0
        return sent, total


def _bucket_bytes(bucket: dist.GradBucket) -> int:
    buffer = bucket.buffer()
    return buffer.numel() * buffer.element_size()


def make_hook(args: argparse.Namespace) -> tuple[Any, Callable, CommMeter, Callable[[], int] | None]:
    """(state, hook, meter, bytes_counter) for ``--compression``."""
    name = args.compression
    if name == "dense":
        meter = CommMeter(lambda state, bucket: _bucket_bytes(bucket))
        return None, meter.wrap(default_hooks.allreduce_hook), meter, None
    if name == "fp16":
        meter = CommMeter(lambda state, bucket: bucket.buffer().numel() * 2)
        return None, meter.wrap(default_hooks.fp16_compress_hook), meter, None
    if name == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=args.powersgd_rank,
            start_powerSGD_iter=max(args.start_iter, 2), use_error_feedback=not args.no_error_feedback,
            warm_start=True, random_seed=args.seed,
        )

        meter = CommMeter(None)
        inner = completed_before_return(powerSGD_hook.powerSGD_hook)

        def counted(state, bucket):
            # PowerSGD counts elements only once compressing; before that it allreduces.
            dense = state.iter < state.start_powerSGD_iter
            before = state.total_numel_after_compression
            future = inner(state, bucket)
            after = state.total_numel_after_compression
            meter._bytes += _bucket_bytes(bucket) if dense else (after - before) * bucket.buffer().element_size()
            return future

        return state, meter.wrap(counted), meter, None
    try:
        compressor = Compressor.from_spec(name, seed=args.seed)
    except ConfigError as error:
        raise SystemExit(f"deepreduce train: --compression {name!r}: {error} (or use one of {', '.join(BUILTIN_HOOKS)})")
    state = DeepReduceState(
        None, compressor, start_iter=args.start_iter, error_feedback=not args.no_error_feedback,
        min_numel=args.min_numel, stats_every=0, dense_fallback=not args.no_dense_fallback,
    )
    meter = CommMeter(None)
    return state, meter.wrap(deepreduce_hook), meter, lambda: state.stats()["sent_bytes"]


# --- training ------------------------------------------------------------------------------


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak; a function of the step
    only, so a resumed run follows the same schedule."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus, args: argparse.Namespace, device: torch.device) -> float:
    """Mean validation loss over the same ``--eval-batches`` batches every time, split
    between ranks."""
    gen = torch.Generator().manual_seed(args.seed + 0x5EED)
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    for i in range(args.eval_batches):
        x, y = corpus.batch("val", args.batch, args.seq_len, gen)
        if i % world == rank:
            total[0] += model.loss(x.to(device), y.to(device)).double()
            total[1] += 1
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def _checkpoint_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.pt"


def _hook_state_dict(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, DeepReduceState):
        return state.state_dict()
    return state.__getstate__()  # PowerSGDState: everything but the process group


def _load_hook_state(state: Any, saved: Any) -> None:
    if state is None:
        return
    if isinstance(state, DeepReduceState):
        state.load_state_dict(saved)
    else:
        state.__setstate__(saved)


def save_checkpoint(directory: Path, step: int, model, optimizer, hook_state, data_gen, args) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    path = _checkpoint_path(directory, rank)
    tmp = path.with_suffix(".tmp")
    torch.save({
        "format": _CHECKPOINT_FORMAT,
        "step": step,
        "world_size": dist.get_world_size(),
        "compression": args.compression,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "hook": _hook_state_dict(hook_state),
        "data_rng": data_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(directory: Path, args, model, optimizer, hook_state, data_gen) -> int:
    path = _checkpoint_path(directory, dist.get_rank())
    if not path.exists():
        raise SystemExit(f"deepreduce train: no checkpoint for rank {dist.get_rank()} at {path}")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("format") != _CHECKPOINT_FORMAT:
        raise SystemExit(f"deepreduce train: {path} is not a checkpoint of this format")
    if saved["world_size"] != dist.get_world_size():
        raise SystemExit(f"deepreduce train: checkpoint is from {saved['world_size']} ranks, this run has {dist.get_world_size()}")
    if saved["compression"] != args.compression:
        raise SystemExit(f"deepreduce train: checkpoint used --compression {saved['compression']}, not {args.compression}")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    _load_hook_state(hook_state, saved["hook"])
    data_gen.set_state(saved["data_rng"])
    torch.set_rng_state(saved["torch_rng"])
    return int(saved["step"])


def _settle_buckets(ddp: DDP, seq_len: int, device: torch.device) -> None:
    """One backward pass with the default allreduce and no optimizer step.

    DDP's first iteration uses one bucket for everything and rebuilds buckets after it
    (in gradient-ready order). A resumed run would otherwise compress its first step in
    a different bucket layout than the uninterrupted run did; settling first makes the
    layouts, and so the results, identical."""
    rng = torch.get_rng_state()
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    ddp(tokens).float().sum().backward()
    ddp.module.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("deepreduce train: --steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    created, device = _init_distributed(args.backend)
    completed = False
    try:
        code = _train(args, device)
        completed = True
        return code
    finally:
        if created:
            close_process_group(completed)


def _train(args: argparse.Namespace, device: torch.device) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    verbose = rank == 0 and not args.quiet
    corpus = stdlib_corpus(int(args.corpus_mb * (1 << 20)))
    torch.manual_seed(args.seed)
    model = ByteTransformer(args.d_model, args.layers, args.heads, args.seq_len).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    hook_state, hook, meter, sent_counter = make_hook(args)
    data_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)
    start = 0
    if args.resume:
        start = load_checkpoint(args.resume, args, model, optimizer, hook_state, data_gen)
    ddp = DDP(model, bucket_cap_mb=args.bucket_mb)
    if start:
        _settle_buckets(ddp, args.seq_len, device)
    ddp.register_comm_hook(hook_state, hook)

    n_params = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"deepreduce train: {world} rank(s), {n_params / 1e6:.2f} M parameters, corpus {corpus.train.numel() / 1e6:.1f} MB "
              f"(digest {corpus.digest}), compression {args.compression}, steps {start}->{args.steps}", flush=True)
    metrics = open(args.metrics, "a" if start else "w") if (args.metrics and rank == 0) else None
    stop = min(args.steps, args.stop_after if args.stop_after is not None else args.steps)
    step_times, bytes_per_step, val_loss = [], [], None
    sent_before = sent_counter() if sent_counter else 0
    try:
        for step in range(start, stop):
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            x, y = corpus.batch("train", args.batch, args.seq_len, data_gen)
            loss = _ddp_loss(ddp, x.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            step_s = time.perf_counter() - began
            sent, comm_s = meter.take()
            if sent_counter:
                now = sent_counter()
                sent, sent_before = now - sent_before, now
            step_times.append(step_s)
            bytes_per_step.append(sent)
            record = {"step": step + 1, "loss": loss_value, "lr": learning_rate(step, args), "bytes_sent": sent,
                      "step_s": step_s, "comm_s": comm_s}
            done = step + 1
            if args.eval_every and (done % args.eval_every == 0 or done == stop):
                val_loss = evaluate(model, corpus, args, device)
                record["val_loss"] = val_loss
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if verbose and args.log_every and (done % args.log_every == 0 or done == stop):
                val = f", val {val_loss:.4f}" if "val_loss" in record else ""
                print(f"step {done:>6}: loss {loss_value:.4f}{val}, {step_s * 1e3:.0f} ms/step, "
                      f"{sent / 1e6:.3f} MB sent, comm {comm_s * 1e3:.0f} ms", flush=True)
            if args.checkpoint and (done == stop or (args.checkpoint_every and done % args.checkpoint_every == 0)):
                save_checkpoint(args.checkpoint, done, model, optimizer, hook_state, data_gen, args)
        summary = {
            "steps": stop, "world_size": world, "compression": args.compression, "parameters": n_params,
            "val_loss": val_loss,
            "median_step_s": statistics.median(step_times) if step_times else None,
            "mean_bytes_per_step": statistics.fmean(bytes_per_step) if bytes_per_step else None,
            "dense_bytes_per_step": 4 * n_params,
            "params_digest": params_digest(model),
        }
        if isinstance(hook_state, DeepReduceState):
            summary["hook"] = hook_state.stats()
        if metrics:
            metrics.write(json.dumps({"summary": summary}) + "\n")
    finally:
        if metrics:
            metrics.close()
    return 0


def read_metrics(path: Path) -> tuple[list[dict], dict | None]:
    """Step records and the summary of a ``deepreduce train --metrics`` file."""
    steps, summary = [], None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line still being written
                continue
            if "summary" in record:
                summary = record["summary"]
            else:
                steps.append(record)
    return steps, summary


def params_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the parameters' bytes: equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _ddp_loss(ddp: DDP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Through DDP's forward (not module.loss) so DDP prepares the backward reduction.
    logits = ddp(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


if __name__ == "__main__":
    sys.exit(main())

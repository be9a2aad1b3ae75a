"""``deepreduce train``: a byte-level transformer LM on the standard library's source text
(or your own, ``--data``), or (``--task classify``) a convolutional classifier of which
stdlib package a snippet of source comes from, with DDP and a choice of gradient
communication. Launched by torchrun::

    torchrun --standalone --nproc_per_node=2 -m deepreduce train --compression topk:0.01/eliasfano/fp16
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        -m deepreduce train --steps 1000 --metrics run.jsonl

Without torchrun it trains in one process (world size 1). ``--compression`` takes a
compressor spec (``deepreduce codecs`` lists the parts) or one of the built-in torch
hooks for comparison: ``dense`` (allreduce), ``fp16`` (fp16_compress_hook) and
``powersgd`` (powerSGD_hook, wrapped so each bucket's future completes before the hook
returns: the stock hook issues collectives from callbacks, which breaks gloo); see
:mod:`deepreduce.apps.comm_hooks`.

``--data PATH`` trains on a text file or a folder of text files instead of the stdlib
(:func:`deepreduce.apps.data.text_corpus`: held-out files, or a single file's tail, for
validation). ``--optimizer`` is ``adam`` (default), ``adamw`` or ``sgd`` (momentum 0.9),
with ``--weight-decay``.

``--task classify`` (:func:`deepreduce.apps.data.stdlib_classes`,
:class:`deepreduce.apps.models.ByteConvClassifier`): ``--classes`` packages, whole files
held out for validation, class-balanced windows of ``--seq-len`` bytes; ``--d-model`` is
the convolution width and ``--layers`` the number of convolutions, ``--heads`` is unused.
Its defaults differ where the LM's do not suit it (see ``TASK_DEFAULTS``).

DGC's recipe, gradient mode with a compressor spec only: ``--momentum-correction``
(momentum moves into the hook; ``--optimizer sgd`` then runs without momentum),
``--density-warmup`` and ``--clip-norm`` (see :class:`deepreduce.DeepReduceState`).

Metrics: one JSON object per line (rank 0 writes them): ``step``, ``loss`` (rank 0's
training loss), ``val_loss`` and, for classify, ``val_acc`` (top-1 accuracy; both on
evaluation steps, over the same validation windows every time), ``lr``, ``bytes_sent`` (bytes this
rank handed to collectives in the step), ``step_s`` and ``comm_s`` (time with a bucket's
reduction in flight, from the hook call to its result, merged over buckets: it includes
the hook's own encode/decode time and overlaps the backward pass). The last line has
``"summary"`` (with the task, the data, its digest and the optimizer).

Checkpoints (``--checkpoint DIR``) hold, per rank, the model, optimizer, hook state
(error-feedback residuals, step, stats), the data stream and RNG state; ``--resume DIR``
continues so that the following steps equal an uninterrupted run bit for bit. It refuses
a checkpoint of another task, world size, compression, DGC options, optimizer, weight
decay or corpus. Each rank keeps its last two checkpoints (``rank<r>.pt`` and
``rank<r>.prev.pt``); ``--auto-resume`` continues from the newest step that every rank
holds in ``--checkpoint DIR``, or starts afresh if there is none, so under
``torchrun --max-restarts=N`` a job whose worker died restarts from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..comm.torch_dist import close_process_group
from ..compressor import Compressor
from ..errors import ConfigError
from ..hooks import DeepReduceState
from ..local_adam import NOISE_ESTIMATES, LocalAdamW
from ..optim import DensityFollowsLR, UpdateSync
from ..engine.pipeline import NODE_SCHEMES, SCHEMES
from .comm_hooks import BUILTIN_HOOKS, CommMeter, hook_state_dict, load_hook_state, make_hook
from .data import ByteCorpus, CorpusError, SnippetClasses, stdlib_classes, stdlib_corpus, text_corpus
from .metrics import params_digest
from .models import ByteConvClassifier, ByteTransformer

TASKS = ("lm", "classify")
OPTIMIZERS = ("adam", "adamw", "local-adamw", "sgd")
SGD_MOMENTUM = 0.9
# Defaults of --task classify where the LM's (the parser's) do not suit it.
TASK_DEFAULTS = {
    "lm": {},
    "classify": {"seq_len": 256, "layers": 4, "batch": 32, "classes": 16, "eval_batches": 32},
}
_CHECKPOINT_FORMAT = 1
DEFAULT_POWERSGD_RANK = 4
# Options a resumed run must share with the checkpoint, beyond those checked one by one in
# load_checkpoint: each changes what the compression or the model does at every step.
_RESUME_FIXED = ("heads", "adam_noise", "start_iter", "min_numel", "small_compression", "granularity",
                 "no_pack_tensors", "scheme", "node_size", "no_error_feedback", "no_dense_fallback", "powersgd_rank",
                 "bucket_mb")


def build_parser(task: str = "lm") -> argparse.ArgumentParser:
    """The parser, with ``task``'s defaults (:data:`TASK_DEFAULTS`); :func:`parse_args`
    picks them from ``--task``."""
    p = argparse.ArgumentParser(
        prog="deepreduce train",
        description="Train a byte-level transformer LM on the standard library's source text (or --data), or "
                    "(--task classify) a convolutional classifier of which stdlib package a snippet comes from, "
                    "with DDP (launch with torchrun; without it, one process). --compression picks the "
                    "gradient communication: a compressor spec or a built-in torch hook.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--task", default="lm", choices=TASKS,
                   help="lm: next-byte language model; classify: which stdlib package a snippet of --seq-len "
                        "bytes comes from (other defaults: " + ", ".join(
                            f"--{k.replace('_', '-')} {v}" for k, v in TASK_DEFAULTS["classify"].items()) + ")")
    m.add_argument("--d-model", type=int, default=128, help="embedding width (classify: convolution channels)")
    m.add_argument("--layers", type=int, default=2, help="transformer blocks (classify: convolutions)")
    m.add_argument("--heads", type=int, default=4, help="attention heads (must divide --d-model; lm only)")
    m.add_argument("--seq-len", type=int, default=128, help="context length in bytes")
    m.add_argument("--classes", type=int, default=None,
                   help="classify: the largest stdlib packages to tell apart")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=300, help="total steps (sets the learning-rate schedule)")
    t.add_argument("--stop-after", type=int, default=None, help="stop after this step (e.g. to resume later)")
    t.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                   help=f"sgd uses momentum {SGD_MOMENTUM}, or none with --momentum-correction; local-adamw: "
                        "AdamW for --mode update (steps as data-parallel AdamW would; use the data-parallel --lr)")
    t.add_argument("--adam-noise", default=None, choices=NOISE_ESTIMATES,
                   help="local-adamw: how it estimates each rank's gradient noise (deepreduce.LocalAdamW's noise=; "
                        "default moments; tracked with --density-follows-lr 0.5 is the recommended update-mode setting)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the optimizer (all parameters)")
    t.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine decay to lr/10")
    t.add_argument("--seed", type=int, default=0, help="model init, data order and compressor streams")
    t.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="a text file or a folder of text files (read recursively) to train on "
                        "instead of the standard library's source (lm only)")
    t.add_argument("--corpus-mb", type=float, default=16,
                   help="megabytes of text to load (classify: shared equally by the classes)")
    t.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's choice)")
    c = p.add_argument_group("communication")
    c.add_argument("--compression", default="dense",
                   help="a compressor spec such as topk:0.01/eliasfano/fp16, or dense | fp16 | powersgd, or auto "
                        "(per bucket dense, fp16 or sparse, from the measured link and compression cost; "
                        "--mode gradient, --scheme allgather)")
    c.add_argument("--mode", default="gradient", choices=("gradient", "update"),
                   help="gradient: compress gradients in the DDP hook; update: every rank steps its own "
                        "optimizer and the compressed parameter updates are averaged (deepreduce.UpdateSync)")
    c.add_argument("--local-steps", type=int, default=1,
                   help="update mode: optimizer steps between exchanges (the density per exchange scales with it)")
    c.add_argument("--outer-lr", type=float, default=1.0, help="update mode: outer SGD learning rate")
    c.add_argument("--outer-momentum", type=float, default=0.0, help="update mode: outer SGD momentum")
    c.add_argument("--nesterov", action="store_true", help="update mode: Nesterov outer momentum")
    c.add_argument("--overlap", action="store_true",
                   help="update mode: apply each exchange one round late so the wire time hides behind compute")
    c.add_argument("--keep-unsent", action="store_true",
                   help="update mode: each rank keeps its not-yet-sent update in its own parameters (flushed densely at the end)")
    c.add_argument("--unsent-scale", type=float, default=1.0, metavar="S",
                   help="update mode with --keep-unsent: each rank's parameters are the agreed ones plus S x its unsent "
                        "update (S > 1: ahead of its own progress, for the others' not yet received; 1.5 with "
                        "--optimizer local-adamw and block top-k, 1 with sgd)")
    c.add_argument("--density-follows-lr", type=float, nargs="?", const=1.0, default=None, metavar="POWER",
                   help="update mode: each exchange's density follows the learning-rate schedule ((lr / mean lr) "
                        "** POWER, default POWER 1; a negative POWER leans towards the decay), the same bytes over the "
                        "run as a constant density (deepreduce.DensityFollowsLR)")
    c.add_argument("--start-iter", type=int, default=10, help="dense steps before compression starts")
    c.add_argument("--min-numel", type=int, default=1024,
                   help="buckets smaller than this go dense; smaller parameters travel uncompressed")
    c.add_argument("--small-compression", default=None, metavar="SPEC",
                   help="compress the tensors below --min-numel with this spec instead of sending them raw "
                        "(e.g. topk:1/strided/uniform:bits=8)")
    c.add_argument("--node-size", type=int, default=None, metavar="L",
                   help="--scheme hierarchical[_shared_index]: processes per node (default: torchrun's "
                        "LOCAL_WORLD_SIZE)")
    c.add_argument("--granularity", default="tensor", choices=("tensor", "bucket"),
                   help="top-k per parameter, or one top-k over each DDP bucket (--mode update: over all the "
                        "parameters, those below --min-numel left to --small-compression when given)")
    c.add_argument("--no-pack-tensors", action="store_true",
                   help="--granularity tensor: one payload per tensor, instead of one for a bucket's large "
                        "tensors (each on its own budget either way)")
    c.add_argument("--scheme", default="allgather", choices=tuple(SCHEMES),
                   help="how compressed buckets travel: every rank's payload to every rank; shared_index: a "
                        "rotating leader's indices and one allreduce of every rank's values there (bytes per rank "
                        "do not grow with the world size; value codecs raw, fp16, bf16); hierarchical (gradient "
                        "mode): dense inside a node, 1/L of each bucket compressed between nodes; "
                        "hierarchical_shared_index: the same with the shared-index allreduce between nodes")
    c.add_argument("--no-error-feedback", action="store_true")
    c.add_argument("--no-dense-fallback", action="store_true")
    c.add_argument("--powersgd-rank", type=int, default=None, metavar="R",
                   help=f"matrix approximation rank of --compression powersgd (default {DEFAULT_POWERSGD_RANK})")
    c.add_argument("--momentum-correction", type=float, default=0.0, metavar="M",
                   help="DGC momentum correction M in the hook (a compressor spec, gradient mode); with "
                        "--optimizer sgd the optimizer then has no momentum of its own")
    c.add_argument("--density-warmup", type=int, default=0, metavar="N",
                   help="DGC: over N steps after --start-iter the density falls exponentially from dense "
                        "to the compressor's")
    c.add_argument("--clip-norm", type=float, default=None, metavar="X",
                   help="DGC: clip gradients locally to norm X before compression")
    c.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket cap")
    c.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    c.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a collective waits for a peer (a dead rank, a down link) before every rank fails")
    o = p.add_argument_group("output")
    o.add_argument("--metrics", type=Path, default=None, help="JSON-lines metrics file (rank 0)")
    o.add_argument("--eval-every", type=int, default=50)
    o.add_argument("--eval-batches", type=int, default=8, help="validation batches of --batch windows")
    o.add_argument("--log-every", type=int, default=25, help="console line every N steps (0: none)")
    o.add_argument("--checkpoint", type=Path, default=None, help="directory for checkpoints (one file per rank)")
    o.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    o.add_argument("--resume", type=Path, default=None, help="checkpoint directory to continue from")
    o.add_argument("--auto-resume", action="store_true",
                   help="continue from --checkpoint DIR if every rank holds a checkpoint there, else start afresh "
                        "(for torchrun --max-restarts)")
    o.add_argument("--quiet", action="store_true")
    p.set_defaults(**TASK_DEFAULTS[task])
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the defaults of the ``--task`` it names."""
    pre = argparse.ArgumentParser(prog="deepreduce train", add_help=False)
    pre.add_argument("--task", default="lm", choices=TASKS)
    task = pre.parse_known_args(argv)[0].task
    parser = build_parser(task)
    args = parser.parse_args(argv)
    if args.auto_resume and (args.checkpoint is None or args.resume is not None):
        parser.error("--auto-resume needs --checkpoint DIR (and no --resume)")
    return args


# --- process group -----------------------------------------------------------------------


def _init_distributed(backend: str, timeout_s: float = 600.0) -> tuple[bool, torch.device]:
    """Join torchrun's group (or a one-process group). Returns (created, device)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    if use_cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if dist.is_initialized():
        return False, device
    chosen = "nccl" if use_cuda else "gloo"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and restart != "0":
        # A restarted worker group reuses torchrun's store, which still holds the first
        # attempt's gloo addresses: a fresh key prefix keeps the ranks off the dead ones.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                              is_master=False)
        dist.init_process_group(chosen, store=dist.PrefixStore(f"deepreduce/attempt{restart}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(chosen, timeout=timeout)
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="deepreduce-store-"), 1)
        dist.init_process_group(chosen, store=store, rank=0, world_size=1)
    return True, device


# --- training ------------------------------------------------------------------------------


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak; a function of the step
    only, so a resumed run follows the same schedule."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """``val_loss``, the mean validation loss over the same ``--eval-batches`` batches every
    time, split between ranks; for classify also ``val_acc``, the top-1 accuracy on them."""
    gen = torch.Generator().manual_seed(args.seed + 0x5EED)
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, batches, correct, windows
    model.eval()
    for i in range(args.eval_batches):
        x, y = corpus.batch("val", args.batch, args.seq_len, gen)
        if i % world == rank:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total[0] += model.logits_loss(logits, y).double()
            total[1] += 1
            total[2] += (logits.argmax(dim=-1) == y).sum()
            total[3] += y.numel()
    model.train()
    dist.all_reduce(total)
    result = {"val_loss": float(total[0] / total[1].clamp(min=1))}
    if args.task == "classify":
        result["val_acc"] = float(total[2] / total[3].clamp(min=1))
    return result


def _checkpoint_path(directory: Path, rank: int, previous: bool = False) -> Path:
    return directory / (f"rank{rank}.prev.pt" if previous else f"rank{rank}.pt")


def _drop_records_after(path: Path, step: int) -> None:
    """Remove the step records past ``step`` that an interrupted run wrote after its last
    checkpoint, so the resumed run's records follow on without repeats."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the crash
            continue
        if not isinstance(record, dict):
            continue
        # a segment's summary (--stop-after) stays if it ends at or before the checkpoint
        last = record["summary"].get("steps", 0) if isinstance(record.get("summary"), dict) else record.get("step", 0)
        if last <= step:
            kept.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def newest_common_checkpoint(directory: Path) -> Path | None:
    """This rank's checkpoint file of the newest step every rank holds in ``directory``
    (a rank killed mid-save may be one checkpoint behind the others); None if none."""
    held = {}
    for previous in (False, True):
        path = _checkpoint_path(directory, dist.get_rank(), previous)
        try:
            held[int(torch.load(path, map_location="cpu", weights_only=False)["step"])] = path
        except FileNotFoundError:
            continue
        except Exception as error:  # a torn or foreign file: the other generation may do
            print(f"deepreduce train: rank {dist.get_rank()}: ignoring unreadable {path}: {error}", file=sys.stderr)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(held))
    common = set(everyone[0]).intersection(*everyone[1:])
    return held[max(common)] if common else None


def data_label(args: argparse.Namespace) -> str:
    """What ``--data`` names, for metrics and checkpoints: the path as given, or ``stdlib``."""
    return str(args.data) if args.data is not None else "stdlib"


def load_corpus(args: argparse.Namespace) -> ByteCorpus | SnippetClasses:
    """The data ``--task``, ``--data``, ``--classes`` and ``--corpus-mb`` ask for; a clear
    exit for bad ``--data`` or ``--classes``."""
    max_bytes = max(1, int(args.corpus_mb * (1 << 20)))
    if args.task == "classify":
        if args.data is not None:
            raise SystemExit("deepreduce train: --data is not supported with --task classify "
                             "(it classifies the standard library's packages)")
        try:
            return stdlib_classes(args.classes, max_bytes)
        except CorpusError as error:
            raise SystemExit(f"deepreduce train: --classes {args.classes}: {error}")
    try:
        # Each split needs more than seq_len + 1 bytes to cut a training window from.
        if args.data is None:
            return stdlib_corpus(max_bytes, min_split_bytes=args.seq_len + 2)
        return text_corpus(args.data, max_bytes, min_split_bytes=args.seq_len + 2)
    except CorpusError as error:
        flag = "--data" if args.data is not None else f"--corpus-mb {args.corpus_mb:g} (with --seq-len {args.seq_len})"
        raise SystemExit(f"deepreduce train: {flag}: {error}")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                   sgd_momentum: float = SGD_MOMENTUM, adam_noise: str | None = None) -> torch.optim.Optimizer:
    """``adam``, ``adamw``, ``local-adamw`` (:class:`deepreduce.LocalAdamW`, for update mode,
    its ``noise`` estimate ``adam_noise``) or ``sgd`` (with ``sgd_momentum``), with
    ``weight_decay`` on every parameter."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=sgd_momentum, weight_decay=weight_decay)
    if name == "local-adamw":  # update mode: AdamW stepping as data-parallel AdamW would (deepreduce.LocalAdamW)
        return LocalAdamW(params, lr=lr, weight_decay=weight_decay, noise=adam_noise or "moments")
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def save_checkpoint(directory: Path, step: int, model, optimizer, hook_state, data_gen, args,
                    corpus_digest: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    path = _checkpoint_path(directory, rank)
    tmp = path.with_suffix(".tmp")
    torch.save({
        "format": _CHECKPOINT_FORMAT,
        "task": args.task,
        "step": step,
        "world_size": dist.get_world_size(),
        "compression": args.compression,
        "dgc": _dgc_options(args),
        "mode": _mode_options(args),
        "optimizer_name": args.optimizer,
        "weight_decay": args.weight_decay,
        "data": data_label(args),
        "corpus_digest": corpus_digest,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "hook": hook_state_dict(hook_state),
        "settings": _resume_settings(args),
        "data_rng": data_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }, tmp)
    if path.exists():
        os.replace(path, _checkpoint_path(directory, rank, previous=True))
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(directory: Path, args, model, optimizer, hook_state, data_gen, corpus_digest: str,
                    path: Path | None = None) -> int:
    """Restore from ``directory``'s newest checkpoint of this rank (or from ``path``);
    returns its step."""
    path = path or _checkpoint_path(directory, dist.get_rank())
    if not path.exists():
        raise SystemExit(f"deepreduce train: no checkpoint for rank {dist.get_rank()} at {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torn by a crash mid-copy, or not a checkpoint at all
        raise SystemExit(f"deepreduce train: cannot read checkpoint {path}: {error}".splitlines()[0])
    if not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT:
        raise SystemExit(f"deepreduce train: {path} is not a checkpoint of this format")
    saved_task = saved.get("task", "lm")  # checkpoints from before --task are LM ones
    if saved_task != args.task:
        raise SystemExit(f"deepreduce train: checkpoint is of --task {saved_task}, not {args.task}")
    if saved["world_size"] != dist.get_world_size():
        raise SystemExit(f"deepreduce train: checkpoint is from {saved['world_size']} ranks, this run has {dist.get_world_size()}")
    if saved["compression"] != args.compression:
        raise SystemExit(f"deepreduce train: checkpoint used --compression {saved['compression']}, not {args.compression}")
    saved_dgc = saved.get("dgc", [0.0, 0, None])  # checkpoints from before these options
    if saved_dgc != _dgc_options(args):
        raise SystemExit(f"deepreduce train: checkpoint used --momentum-correction/--density-warmup/--clip-norm "
                         f"{saved_dgc}, this run {_dgc_options(args)}")
    mode = _mode_options(args)
    saved_mode = saved.get("mode", ["gradient", 1, False, 1.0, 0.0, False, False])
    added_since = [None, 1.0]  # checkpoints from before --density-follows-lr, --unsent-scale: their defaults
    missing = len(mode) - len(saved_mode)
    if 0 < missing <= len(added_since):
        saved_mode = saved_mode + added_since[len(added_since) - missing:]
    if saved_mode != mode:
        raise SystemExit(f"deepreduce train: checkpoint used mode/local steps/overlap/outer lr/outer momentum/nesterov/keep unsent/"
                         f"density follows lr/unsent scale {saved_mode}, this run {mode}")
    settings = _resume_settings(args)
    changed = [f"--{name.replace('_', '-')} {saved_value!r} -> {settings[name]!r}"
               for name, saved_value in saved.get("settings", {}).items()  # checkpoints from before: not checked
               if settings.get(name, saved_value) != saved_value]
    if changed:
        raise SystemExit(f"deepreduce train: this run changes options the checkpoint was trained with: {'; '.join(changed)}")
    # Checkpoints written before these options existed trained with Adam, no weight decay.
    saved_optimizer = saved.get("optimizer_name", "adam")
    if saved_optimizer != args.optimizer:
        raise SystemExit(f"deepreduce train: checkpoint used --optimizer {saved_optimizer}, not {args.optimizer}")
    saved_decay = saved.get("weight_decay", 0.0)
    if saved_decay != args.weight_decay:
        raise SystemExit(f"deepreduce train: checkpoint used --weight-decay {saved_decay}, not {args.weight_decay}")
    saved_digest = saved.get("corpus_digest")
    if saved_digest is not None and saved_digest != corpus_digest:
        raise SystemExit(f"deepreduce train: checkpoint trained on {saved.get('data', 'other data')} (corpus digest "
                         f"{saved_digest}); this run's data ({data_label(args)}, --corpus-mb {args.corpus_mb:g}) "
                         f"has digest {corpus_digest}")
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as error:  # other shapes or layers: another --d-model, --layers, --heads, --seq-len ...
        first = str(error).strip().splitlines()
        raise SystemExit(f"deepreduce train: {path} holds another model than this run's options build "
                         f"(--d-model, --layers, --heads, --seq-len, --classes?): {' '.join(line.strip() for line in first[1:3])}")
    optimizer.load_state_dict(saved["optimizer"])
    load_hook_state(hook_state, saved["hook"])
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


def _mode_options(args: argparse.Namespace) -> list:
    return [args.mode, args.local_steps, args.overlap, args.outer_lr, args.outer_momentum, args.nesterov, args.keep_unsent,
            args.density_follows_lr, args.unsent_scale]


def _resume_settings(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _RESUME_FIXED}


def _dgc_options(args: argparse.Namespace) -> list:
    return [args.momentum_correction, args.density_warmup, args.clip_norm]


def _check_args(args: argparse.Namespace) -> None:
    """Exit with a clear message for options that do not go together."""
    if args.steps < 1:
        raise SystemExit("deepreduce train: --steps must be >= 1")
    for flag, value in (("--batch", args.batch), ("--seq-len", args.seq_len), ("--d-model", args.d_model),
                        ("--layers", args.layers), ("--eval-batches", args.eval_batches)):
        if value < 1:
            raise SystemExit(f"deepreduce train: {flag} must be >= 1, not {value}")
    for flag, value in (("--eval-every", args.eval_every), ("--log-every", args.log_every),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value < 0:
            raise SystemExit(f"deepreduce train: {flag} must be >= 0 (0: never), not {value}")
    if args.stop_after is not None and args.stop_after < 1:
        raise SystemExit(f"deepreduce train: --stop-after must be >= 1, not {args.stop_after}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"deepreduce train: --threads must be >= 1 (leave it out for torch's choice), not {args.threads}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SystemExit(f"deepreduce train: --lr must be a finite number > 0, not {args.lr}")
    if not (math.isfinite(args.corpus_mb) and args.corpus_mb > 0):
        raise SystemExit(f"deepreduce train: --corpus-mb must be a finite number > 0, not {args.corpus_mb}")
    if not (math.isfinite(args.bucket_mb) and args.bucket_mb > 0):
        raise SystemExit(f"deepreduce train: --bucket-mb must be a finite number > 0, not {args.bucket_mb}")
    if args.task == "lm" and (args.heads < 1 or args.d_model % args.heads):
        raise SystemExit(f"deepreduce train: --heads must be >= 1 and divide --d-model ({args.d_model}), not {args.heads}")
    if args.metrics is not None and not args.metrics.parent.is_dir():
        raise SystemExit(f"deepreduce train: --metrics {args.metrics}: no directory {args.metrics.parent}")
    if args.metrics is not None and args.metrics.is_dir():
        raise SystemExit(f"deepreduce train: --metrics {args.metrics} is a directory; name a file (JSON lines) in it")
    if args.warmup < 0:
        raise SystemExit(f"deepreduce train: --warmup must be >= 0, not {args.warmup}")
    if args.powersgd_rank is not None:
        if args.compression != "powersgd":
            raise SystemExit(f"deepreduce train: --powersgd-rank applies to --compression powersgd, not {args.compression!r}")
        if args.powersgd_rank < 1:
            raise SystemExit(f"deepreduce train: --powersgd-rank must be >= 1, not {args.powersgd_rank}")
    if args.small_compression is not None:
        try:
            Compressor.from_spec(args.small_compression)
        except ConfigError as error:
            raise SystemExit(f"deepreduce train: --small-compression {args.small_compression}: {error}")
    if args.checkpoint is not None:
        try:
            args.checkpoint.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SystemExit(f"deepreduce train: --checkpoint {args.checkpoint}: cannot create it ({error.strerror or error})")
    if args.weight_decay < 0:
        raise SystemExit("deepreduce train: --weight-decay must be >= 0")
    if args.adam_noise is not None and args.optimizer != "local-adamw":
        raise SystemExit("deepreduce train: --adam-noise needs --optimizer local-adamw")
    if args.local_steps < 1:
        raise SystemExit("deepreduce train: --local-steps must be >= 1")
    if args.density_follows_lr is not None and (args.mode != "update" or not math.isfinite(args.density_follows_lr)):
        raise SystemExit("deepreduce train: --density-follows-lr needs --mode update and a finite POWER")
    if args.scheme in NODE_SCHEMES and args.mode != "gradient":
        raise SystemExit(f"deepreduce train: --scheme {args.scheme} needs --mode gradient")
    if args.node_size is not None and (args.scheme not in NODE_SCHEMES or args.node_size < 1):
        raise SystemExit("deepreduce train: --node-size must be >= 1 and needs --scheme hierarchical "
                         "(or hierarchical_shared_index)")
    if args.mode == "update" and (args.compression in BUILTIN_HOOKS or args.compression == "auto"):
        raise SystemExit(f"deepreduce train: --mode update needs a compressor spec for --compression, not {args.compression!r}")
    if args.mode == "gradient" and (args.local_steps != 1 or args.overlap or args.keep_unsent or args.outer_lr != 1.0
                                    or args.outer_momentum or args.nesterov):
        raise SystemExit("deepreduce train: --local-steps, --overlap, --keep-unsent, --outer-lr, --outer-momentum and "
                         "--nesterov need --mode update")
    if args.compression in BUILTIN_HOOKS:
        ignored = [flag for flag, given in (("--granularity bucket", args.granularity != "tensor"),
                                             ("--no-error-feedback", args.no_error_feedback),
                                             ("--no-dense-fallback", args.no_dense_fallback),
                                             ("--small-compression", args.small_compression is not None)) if given]
        if ignored:
            raise SystemExit(f"deepreduce train: {', '.join(ignored)} apply to deepreduce compressor specs, "
                             f"not --compression {args.compression}")
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("deepreduce train: --backend nccl needs a CUDA device, and torch sees none (use gloo or auto)")
    if not (math.isfinite(args.unsent_scale) and args.unsent_scale > 0):
        raise SystemExit(f"deepreduce train: --unsent-scale must be a finite number > 0, not {args.unsent_scale}")
    if args.unsent_scale != 1.0 and not (args.mode == "update" and args.keep_unsent):
        raise SystemExit("deepreduce train: --unsent-scale needs --mode update --keep-unsent")
    if args.momentum_correction or args.density_warmup or args.clip_norm is not None:
        if args.mode != "gradient":
            raise SystemExit("deepreduce train: --momentum-correction, --density-warmup and --clip-norm need --mode gradient")
        if args.compression in BUILTIN_HOOKS:
            raise SystemExit("deepreduce train: --momentum-correction, --density-warmup and --clip-norm need a "
                             f"compressor spec for --compression, not {args.compression!r}")
    if args.scheme != "allgather" and args.compression in BUILTIN_HOOKS:
        raise SystemExit(f"deepreduce train: --scheme {args.scheme} needs a compressor spec for --compression, "
                         f"not {args.compression!r}")
    if not 0.0 <= args.momentum_correction < 1.0:
        raise SystemExit(f"deepreduce train: --momentum-correction must be in [0, 1), not {args.momentum_correction}")
    if args.density_warmup < 0:
        raise SystemExit(f"deepreduce train: --density-warmup must be >= 0, not {args.density_warmup}")
    if args.clip_norm is not None and not args.clip_norm > 0:
        raise SystemExit(f"deepreduce train: --clip-norm must be > 0, not {args.clip_norm}")
    if args.task == "classify":
        if args.classes is None or args.classes < 2:
            raise SystemExit(f"deepreduce train: --classes must be >= 2, not {args.classes}")
    elif args.classes is not None:
        raise SystemExit("deepreduce train: --classes needs --task classify")


def check_options(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed and checked as :func:`main` would before it starts anything, the
    compressor spec included: SystemExit with the same message for bad options."""
    args = parse_args(argv)
    _check_args(args)
    if args.compression not in BUILTIN_HOOKS and args.compression != "auto":
        try:
            Compressor.from_spec(args.compression)
        except ConfigError as error:  # worded as make_hook words it
            builtin = f" (or use one of {', '.join(BUILTIN_HOOKS)}, or auto)" if args.mode == "gradient" else ""
            raise SystemExit(f"deepreduce train: --compression {args.compression!r}: {error}{builtin}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = check_options(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args)
    if not args.timeout > 0:
        raise SystemExit(f"deepreduce train: --timeout must be > 0, got {args.timeout:g}")
    created, device = _init_distributed(args.backend, args.timeout)
    completed = False
    try:
        code = _train(args, device, corpus)
        completed = True
        return code
    finally:
        if created:
            close_process_group(completed)


def _hook(args: argparse.Namespace, model: torch.nn.Module):
    try:
        return make_hook(
            args.compression, seed=args.seed, start_iter=args.start_iter, min_numel=args.min_numel,
            error_feedback=not args.no_error_feedback, dense_fallback=not args.no_dense_fallback,
            powersgd_rank=args.powersgd_rank or DEFAULT_POWERSGD_RANK, granularity=args.granularity, named_parameters=model.named_parameters(),
            momentum=args.momentum_correction, density_warmup=args.density_warmup, clip_norm=args.clip_norm,
            small_compressor=args.small_compression,
            scheme=args.scheme, node_size=args.node_size, pack_tensors=not args.no_pack_tensors,
        )
    except ConfigError as error:
        raise SystemExit(f"deepreduce train: --compression {error}")


def _update_sync(args: argparse.Namespace, model: torch.nn.Module, ddp: DDP) -> UpdateSync:
    """The update-mode exchange for ``--compression`` (a compressor spec)."""
    try:
        compressor = Compressor.from_spec(args.compression, seed=args.seed)
        start_iter = -(-args.start_iter // args.local_steps)  # exchanges
        schedule = None
        if args.density_follows_lr is not None and start_iter * args.local_steps < args.steps:
            schedule = DensityFollowsLR(lambda step: learning_rate(step, args), args.steps,
                                        start=start_iter * args.local_steps, power=args.density_follows_lr)
        return UpdateSync(
            model.named_parameters(), compressor, local_steps=args.local_steps, outer_lr=args.outer_lr,
            outer_momentum=args.outer_momentum, nesterov=args.nesterov, overlap=args.overlap,
            keep_unsent=args.keep_unsent, unsent_scale=args.unsent_scale, broadcast=False,
            ddp=ddp, min_numel=args.min_numel, error_feedback=not args.no_error_feedback,
            dense_fallback=not args.no_dense_fallback, granularity=args.granularity, scheme=args.scheme,
            start_iter=start_iter, small_compressor=args.small_compression, density_schedule=schedule,
            pack_tensors=not args.no_pack_tensors,
        )
    except ConfigError as error:
        raise SystemExit(f"deepreduce train: --mode update: {error}")


def _wrap(model: torch.nn.Module, args: argparse.Namespace) -> DDP:
    # The models' only buffer is the LM's constant causal mask: broadcasting it at every
    # forward, as DDP does by default, would add a collective (and 16 kB at seq_len 64)
    # to every step, outside what the step's own exchange sends. (torch 2.13 renamed the
    # option; the new one still syncs buffers once, at construction.)
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, bucket_cap_mb=args.bucket_mb, forward_sync_buffers=False)
    return DDP(model, bucket_cap_mb=args.bucket_mb, broadcast_buffers=False)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model ``--task`` trains, from the model options that apply to it."""
    if args.task == "classify":
        return ByteConvClassifier(args.classes, width=args.d_model, n_layers=args.layers)
    return ByteTransformer(args.d_model, args.layers, args.heads, args.seq_len)


def _train(args: argparse.Namespace, device: torch.device, corpus: ByteCorpus | SnippetClasses) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    verbose = rank == 0 and not args.quiet
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    # With momentum correction the hook carries the momentum, so SGD must not add its own.
    sgd_momentum = 0.0 if args.momentum_correction > 0 else SGD_MOMENTUM
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay, sgd_momentum,
                               args.adam_noise)
    data_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)
    start = 0
    sync = None
    resume_from = _checkpoint_path(args.resume, rank) if args.resume else None
    if args.auto_resume:
        resume_from = newest_common_checkpoint(args.checkpoint)
    if args.mode == "update":
        ddp = _wrap(model, args)  # broadcasts rank 0's parameters
        sync = _update_sync(args, model, ddp)  # DDP keeps local gradients from now on
        hook_state, meter, sent_counter = sync, CommMeter(None), lambda: sync.stats()["sent_bytes"]
        if resume_from:
            # after DDP's broadcast: with overlapped exchanges each rank has its own parameters
            start = load_checkpoint(resume_from.parent, args, model, optimizer, sync, data_gen, corpus.digest, resume_from)
    else:
        hook_state, hook, meter, sent_counter = _hook(args, model)
        if resume_from:
            start = load_checkpoint(resume_from.parent, args, model, optimizer, hook_state, data_gen, corpus.digest,
                                    resume_from)
        ddp = _wrap(model, args)
        if start:
            _settle_buckets(ddp, args.seq_len, device)
        ddp.register_comm_hook(hook_state, hook)

    n_params = sum(p.numel() for p in model.parameters())
    if verbose:
        what = f"{len(corpus.classes)} classes of " if args.task == "classify" else ""
        print(f"deepreduce train: {args.task}, {world} rank(s), {n_params / 1e6:.2f} M parameters, {what}"
              f"{data_label(args)} corpus {corpus.train_bytes / 1e6:.1f} MB (digest {corpus.digest}), {args.optimizer}, compression "
              f"{args.compression}, steps {start}->{args.steps}", flush=True)
    if args.auto_resume and rank == 0:  # a restart is worth a line even with --quiet
        print(f"deepreduce train: --auto-resume: resuming from step {start} of {resume_from}" if resume_from
              else f"deepreduce train: --auto-resume: no checkpoint in {args.checkpoint} yet, starting afresh",
              file=sys.stderr, flush=True)
    if start and args.metrics and rank == 0:
        _drop_records_after(args.metrics, start)
    metrics = open(args.metrics, "a" if start else "w") if (args.metrics and rank == 0) else None
    stop = min(args.steps, args.stop_after if args.stop_after is not None else args.steps)
    step_times, bytes_per_step, evaluation = [], [], {}
    sent_before = sent_counter() if sent_counter else 0
    saved_at = start if resume_from else None
    try:
        for step in range(start, stop):
            try:
                began = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, args)
                x, y = corpus.batch("train", args.batch, args.seq_len, data_gen)
                loss = _ddp_loss(ddp, x.to(device), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                exchange_began = time.perf_counter()
                if sync is not None:
                    sync.step()
                    if step + 1 == args.steps:
                        sync.finish()  # every rank ends with the same parameters (overlap, a partial round, unsent updates)
                loss_value = loss.item()
                step_s = time.perf_counter() - began
                sent, comm_s = meter.take()
                if sync is not None:
                    comm_s = step_s - (exchange_began - began)
                if sent_counter:
                    now = sent_counter()
                    sent, sent_before = now - sent_before, now
                step_times.append(step_s)
                bytes_per_step.append(sent)
                record = {"step": step + 1, "loss": loss_value, "lr": learning_rate(step, args), "bytes_sent": sent,
                          "step_s": step_s, "comm_s": comm_s}
                done = step + 1
                if args.eval_every and (done % args.eval_every == 0 or done == stop):
                    # the agreed parameters; with --keep-unsent each rank's own, which include its unsent update
                    with sync.consensus() if sync is not None and not sync.keep_unsent else contextlib.nullcontext():
                        evaluation = evaluate(model, corpus, args, device)
                    record.update(evaluation)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if verbose and args.log_every and (done % args.log_every == 0 or done == stop):
                    val = f", val {record['val_loss']:.4f}" if "val_loss" in record else ""
                    val += f", acc {record['val_acc']:.3f}" if "val_acc" in record else ""
                    print(f"step {done:>6}: loss {loss_value:.4f}{val}, {step_s * 1e3:.0f} ms/step, "
                          f"{sent / 1e6:.3f} MB sent, comm {comm_s * 1e3:.0f} ms", flush=True)
                if args.checkpoint and (done == stop or (args.checkpoint_every and done % args.checkpoint_every == 0)):
                    save_checkpoint(args.checkpoint, done, model, optimizer, hook_state, data_gen, args, corpus.digest)
                    saved_at = done
            except Exception:
                where = f"the last checkpoint is step {saved_at} in {args.checkpoint}" if saved_at else "no checkpoint saved"
                print(f"deepreduce train: rank {rank} failed in step {step + 1} of {stop} ({where}):",
                      file=sys.stderr, flush=True)
                raise
        summary = {
            "task": args.task, "steps": stop, "world_size": world, "compression": args.compression,
            "parameters": n_params, "mode": args.mode, "scheme": args.scheme, "local_steps": args.local_steps,
            "momentum_correction": args.momentum_correction, "density_warmup": args.density_warmup,
            "density_follows_lr": args.density_follows_lr, "keep_unsent": args.keep_unsent, "unsent_scale": args.unsent_scale,
            "clip_norm": args.clip_norm,
            "data": data_label(args), "corpus_digest": corpus.digest,
            "optimizer": args.optimizer, "weight_decay": args.weight_decay,
            "val_loss": evaluation.get("val_loss"),
            "median_step_s": statistics.median(step_times) if step_times else None,
            "mean_bytes_per_step": statistics.fmean(bytes_per_step) if bytes_per_step else None,
            "dense_bytes_per_step": 4 * n_params,
            "params_digest": params_digest(model),
        }
        if args.task == "classify":
            summary["classes"] = list(corpus.classes)
            summary["val_acc"] = evaluation.get("val_acc")
        if isinstance(hook_state, (DeepReduceState, UpdateSync)):
            summary["hook"] = hook_state.stats()
        if metrics:
            metrics.write(json.dumps({"summary": summary}) + "\n")
    finally:
        if metrics:
            metrics.close()
    return 0


def _ddp_loss(ddp: DDP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Through DDP's forward (not module.loss) so DDP prepares the backward reduction;
    # the model says how its logits become a loss.
    return ddp.module.logits_loss(ddp(x), y)


if __name__ == "__main__":
    sys.exit(main())

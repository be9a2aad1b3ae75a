"""``deepreduce demo``: dense vs. compressed training side by side, on 2 local workers.

Trains the byte-level transformer on the standard library's source text with
``torchrun --standalone --nproc_per_node=2`` (gloo) three times -- the plain allreduce,
compressed gradients in the DDP hook, compressed parameter updates (update mode) at about
the same bytes -- then prints final validation loss, bytes sent per step, compression
ratio and step time in one table.

On one machine the "network" is loopback, so step time shows the cost of compressing
rather than the time saved on a slow link; ``deepreduce bench bandwidth`` (or
``launch/netns-cluster --rate 100mbit``) measures that.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .bench import make_console
from .bench.convergence import AHEAD, BLOCK_SPEC, FOLLOW_LR, SMALL_CYCLIC, TRACKED
from .metrics import read_metrics
from .train import check_options

DEFAULT_SPEC = "topk:0.01/eliasfano/fp16"  # gradient mode: the DDP hook
# Update mode at about the hook's bytes: the convergence benchmark's `update H=1 LocalAdamW blocks,
# ahead 1.5` row (README, "Which to pick").
DEFAULT_UPDATE_SPEC = BLOCK_SPEC


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepreduce demo",
                                description="Train dense and compressed side by side on local workers "
                                            "(torchrun, gloo) and print one table.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compression", action="append", default=None,
                   help="a compressor spec for the DDP hook (gradient mode) to compare with dense (repeatable; also "
                        f"fp16 or powersgd) [default: {DEFAULT_SPEC}, and the update mode below]")
    p.add_argument("--update", action="append", default=None, metavar="SPEC",
                   help="a compressor spec for the update mode (deepreduce.UpdateSync with deepreduce.LocalAdamW, "
                        "noise tracked, unsent updates kept at 1.5x, small tensors an eighth per step, bytes "
                        "that follow the learning rate) "
                        f"[default: {DEFAULT_UPDATE_SPEC}, and the hook above]")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="keep metrics and logs here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more `deepreduce train` options for every run")
    return p


# Small enough for 2 cores; large enough that compression has something to do.
TRAIN_ARGS = ["--d-model", "128", "--layers", "2", "--heads", "4", "--seq-len", "64", "--batch", "8",
              "--lr", "3e-3", "--corpus-mb", "4", "--threads", "1", "--start-iter", "10"]


HOOK_ARGS: list[str] = []
# The recommended Adam setting of the update mode: LocalAdamW (steps as data-parallel Adam would,
# at the same learning rate) with its noise tracked, parameters 1.5x ahead of the unsent update,
# biases and norms an eighth per step, the run's bytes spent as the learning rate goes.
UPDATE_ARGS = ["--mode", "update", "--optimizer", "local-adamw", *TRACKED, "--keep-unsent", *AHEAD, *SMALL_CYCLIC,
               *FOLLOW_LR]


def train_argv(train_args: list[str], args: argparse.Namespace, metrics: Path) -> list[str]:
    """The ``deepreduce train`` options of one run."""
    return [*TRAIN_ARGS, "--steps", str(args.steps), "--seed", str(args.seed), *train_args, "--metrics", str(metrics),
            "--log-every", "0", "--eval-every", str(max(1, args.steps // 6)), *args.extra]


def run_one(name: str, label: str, train_args: list[str], args: argparse.Namespace, out: Path, progress: Progress) -> dict:
    metrics, log = out / f"{name}.jsonl", out / f"{name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.workers}",
           "-m", "deepreduce", "train", *train_argv(train_args, args, metrics)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    title = label if len(label) <= 36 else label[:35] + "…"
    task = progress.add_task(f"{title:<36}", total=args.steps)
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                steps, _ = read_metrics(metrics)
                progress.update(task, completed=len(steps))
                time.sleep(0.5)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    steps, summary = read_metrics(metrics)
    progress.update(task, completed=len(steps))
    if proc.returncode or summary is None:
        raise SystemExit(f"deepreduce demo: the {label} run failed (exit {proc.returncode}):\n{_failure(log)}\n"
                         f"(full log: {log})")
    return {"name": name, "compression": label, "steps": steps, "summary": summary}


def _failure(log: Path) -> str:
    """The lines of a failed run's log that say why: the workers' own error lines (torchrun's
    report around them repeats them in a traceback), else the log's last lines."""
    lines = log.read_text(errors="replace").splitlines()
    said = [line for line in lines if line.startswith("deepreduce train:") or _is_error_line(line)]
    return "\n".join(dict.fromkeys(said[-4:]) if said else lines[-25:])


def _is_error_line(line: str) -> bool:
    head = line.split(":", 1)[0]
    return head.isidentifier() and head.endswith(("Error", "Exception")) and head != "ChildFailedError"


def _row(run: dict, dense_bytes: float) -> list[str]:
    steps, summary = run["steps"], run["summary"]
    sent = statistics.median(r["bytes_sent"] for r in steps)
    return [
        run["compression"],
        f"{summary['val_loss']:.3f}",
        f"{sent / 1e6:.3f} MB" if sent >= 1e5 else f"{sent / 1e3:.1f} kB",
        f"{dense_bytes / sent:.0f}x" if sent else "-",
        f"{1e3 * statistics.median(r['step_s'] for r in steps):.0f} ms",
        f"{1e3 * statistics.median(r['comm_s'] for r in steps):.0f} ms",
    ]


def _curves(runs: list[dict]) -> Table:
    table = Table(title="validation loss by step")
    table.add_column("step", justify="right")
    for run in runs:
        table.add_column(run["compression"], justify="right")
    evals = [{r["step"]: r["val_loss"] for r in run["steps"] if "val_loss" in r} for run in runs]
    for step in sorted(set().union(*evals)):
        table.add_row(str(step), *(f"{e[step]:.3f}" if step in e else "" for e in evals))
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.workers < 1 or args.steps < 1:
        raise SystemExit(f"deepreduce demo: --workers and --steps must be >= 1, not {args.workers} and {args.steps}")
    hooks = args.compression or ([] if args.update else [DEFAULT_SPEC])
    updates = args.update or ([] if args.compression else [DEFAULT_UPDATE_SPEC])
    rows = [("dense", "dense", ["--compression", "dense"])]
    rows += [(f"hook{i + 1}", f"hook {spec}", ["--compression", spec] + (HOOK_ARGS if spec not in ("fp16", "powersgd") else []))
             for i, spec in enumerate(hooks)]
    rows += [(f"update{i + 1}", f"update {spec}", ["--compression", spec, *UPDATE_ARGS]) for i, spec in enumerate(updates)]
    for _, label, train_args in rows:  # every run's options, before the first run starts
        try:
            check_options(train_argv(train_args, args, Path(tempfile.gettempdir()) / "metrics.jsonl"))
        except SystemExit as refused:
            raise SystemExit(f"deepreduce demo: the {label} run: {refused}") from None
    console = make_console()
    out = args.out or Path(tempfile.mkdtemp(prefix="deepreduce-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]deepreduce demo[/]: byte-level transformer on the stdlib's source, {args.workers} workers "
                  f"(torchrun, gloo), {args.steps} steps per run; logs in {out}")
    runs = []
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for name, label, train_args in rows:
            runs.append(run_one(name, label, train_args, args, out, progress))

    dense_bytes = statistics.median(r["bytes_sent"] for r in runs[0]["steps"])
    table = Table(title=f"{args.steps} steps, {args.workers} workers (medians over steps)")
    for column in ("configuration", "val loss", "bytes/step", "ratio", "step time", "comm time"):
        table.add_column(column, no_wrap=True, justify="left" if column == "configuration" else "right")
    for run in runs:
        table.add_row(*_row(run, dense_bytes))
    console.print(table)
    console.print(_curves(runs))
    console.print(
        "hook: gradients compressed in the DDP hook; update: each worker steps its own Adam "
        "(deepreduce.LocalAdamW) and the compressed parameter updates are averaged (deepreduce.UpdateSync). bytes/step: what each worker "
        "hands to collectives per step (the first steps are dense). comm time: a bucket's reduction in "
        "flight, encode and decode included (update mode: the exchange). "
        "Loopback makes the network free here, so step time shows the cost of compressing; on a slow "
        "link the bytes decide (try launch/netns-cluster --rate 100mbit). "
        f"Total {time.perf_counter() - started:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

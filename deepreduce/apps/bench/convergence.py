"""Convergence benchmark: does a configuration learn as well as dense, and how long does it
take over a slow link to get there?

Two real tasks that need no download (``deepreduce train --task lm``: a byte-level
transformer language model on the standard library's source; ``--task classify``: which
stdlib package a snippet of source comes from, a convolutional classifier), each with
AdamW and with SGD + momentum, several seeds. Every configuration trains the same steps
from the same seed and data on 2 ranks (loopback), and the benchmark reports:

- the final validation metric (loss for ``lm``, accuracy for ``classify``), mean and
  spread over seeds, and its gap to dense (relative);
- the steps until the metric first reaches dense's final value (evaluated every
  ``--eval-every`` steps);
- the wall-clock to that point over an emulated link (``--link``, default 100 Mbit/s,
  network namespaces as in ``launch/netns-cluster``): each configuration's step time is
  measured there in a separate short run on 2 emulated nodes (its dense warm-up steps
  and its compressed steps apart), then applied to the step count. Training is
  deterministic, so the steps to a target do not depend on the link; only their time
  does.

    deepreduce bench convergence                      # full run (hours on 2 cores)
    deepreduce bench convergence --tasks lm --optimizers adamw --seeds 0
    deepreduce bench convergence --quick              # seconds: a smoke test

Runs already stored in ``results/convergence.json`` with the same settings are reused, so
an interrupted benchmark continues where it stopped.

A configuration that ends short of dense's final metric has no time to target at equal
steps. ``--target-steps N`` (below ``--steps``) answers how long it takes anyway: dense
trains N steps and sets the target, every other row trains ``--steps`` (its learning-rate
schedule stretched to them), and the steps and time to dense's final metric are read off
the longer runs (a separate section of RESULTS.md, ``convergence-longer``):

    deepreduce bench convergence --tasks lm --steps 1800 --target-steps 1500 \
        --rows dense "update H=1" "powersgd r4"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..metrics import read_metrics
from . import check_link_rate, output_dir, machine_facts, make_console, markdown_table, progress_bar, reproduce_command, update_results_section, write_json

# The compressed rows move at most 1 % of dense's bytes per step once compression starts,
# the update mode's final dense flush included. The hook: top-1 % (Elias-Fano indices, fp16
# values: ~24 bits per kept element), tensors below min_numel (biases, norms) whole, as by
# default, about as much again in these small models (1.6 % on the LM). The update mode
# with H=1: top-3.1 % with 1-bit values (bf16 block scales; ~7.5 bits per kept element),
# and the small tensors an eighth of each per exchange in fp16 (cyclic, packed into a few
# payloads), error feedback keeping the rest; with H=4 and 16 the small tensors travel
# whole once per exchange, within 1 % as they are.
HOOK_SPEC = "topk:0.01/eliasfano/fp16"
UPDATE_SPEC = "topk:0.035/eliasfano/uniform:bits=1"
UPDATE_H1_SPEC = "topk:0.031/eliasfano/uniform:bits=1,scale=bf16"
# Whole blocks of 128 with 1-bit values: block ids cost a few bits per block, so at the same
# bytes about 6x the elements of top-k travel (benchmarks/RESULTS.md, block top-k).
BLOCK_SPEC = "blocktopk:0.215,block=128/blocks:block=128/uniform:bits=1,scale=bf16"
BLOCK_SMALL_WHOLE_SPEC = "blocktopk:0.215,block=128/blocks:block=128/uniform:bits=1"
SMALL_CYCLIC = ["--small-compression", "cyclic:0.125/strided/fp16"]
FOLLOW_LR = ["--density-follows-lr", "0.5"]
# Each rank's parameters the agreed ones plus 1.5x its unsent update (UpdateSync(unsent_scale=1.5)).
AHEAD = ["--unsent-scale", "1.5"]
# LocalAdamW(noise="tracked"): each rank's gradient noise averaged over the second moment's horizon.
TRACKED = ["--adam-noise", "tracked"]


def update_row(spec: str, local_steps: int, small: list[str] | None = None) -> list[str]:
    """``deepreduce train`` arguments of an update-mode row (``keep_unsent``)."""
    return ["--compression", spec, *(small or []), "--mode", "update", "--keep-unsent", "--local-steps", str(local_steps)]


LONGER_DENSE = "dense, longer schedule"
ROWS: dict[str, list[str]] = {
    "dense": ["--compression", "dense"],
    # With --target-steps: dense on the longer schedule too, so a row's time to target is
    # compared with the best dense itself does on that schedule, not only with its own end.
    LONGER_DENSE: ["--compression", "dense"],
    "fp16": ["--compression", "fp16"],
    "powersgd r4": ["--compression", "powersgd", "--powersgd-rank", "4"],
    "hook top-1%": ["--compression", HOOK_SPEC],
    "hook top-1% + DGC recipe": ["--compression", HOOK_SPEC, "--density-warmup", "300"],
    "update H=1": update_row(UPDATE_H1_SPEC, 1, SMALL_CYCLIC),
    "update H=1, bytes follow lr": [*update_row(UPDATE_H1_SPEC, 1, SMALL_CYCLIC), *FOLLOW_LR],
    "update H=1, ahead 1.5": [*update_row(UPDATE_H1_SPEC, 1, SMALL_CYCLIC), *AHEAD],
    # One top-k over all the large tensors instead of one per tensor.
    "update H=1, one top-k": [*update_row(UPDATE_H1_SPEC, 1, SMALL_CYCLIC), "--granularity", "bucket"],
    "update H=4": update_row(UPDATE_SPEC, 4),
    "update H=16": update_row(UPDATE_SPEC, 16),
    "update H=1 LocalAdamW": update_row(UPDATE_H1_SPEC, 1, SMALL_CYCLIC),
    "update H=1 LocalAdamW blocks": update_row(BLOCK_SPEC, 1, SMALL_CYCLIC),
    "update H=1 LocalAdamW blocks, ahead 1.5": [*update_row(BLOCK_SPEC, 1, SMALL_CYCLIC), *AHEAD],
    # The same with one block top-k over all the large tensors (one encode, not one per tensor).
    "update H=1 LocalAdamW blocks, ahead 1.5, one top-k": [*update_row(BLOCK_SPEC, 1, SMALL_CYCLIC), *AHEAD,
                                                           "--granularity", "bucket"],
    # The same bytes over the run, spent as the learning rate goes: (lr / mean lr) ** 0.5.
    "update H=1 LocalAdamW blocks, bytes follow lr": [*update_row(BLOCK_SPEC, 1, SMALL_CYCLIC), *FOLLOW_LR],
    # Ahead 1.5 with both: LocalAdamW's noise tracked over v's horizon and bytes that follow the rate.
    "update H=1 LocalAdamW tracked blocks, ahead 1.5, bytes follow lr": [*update_row(BLOCK_SPEC, 1, SMALL_CYCLIC), *AHEAD,
                                                                        *TRACKED, *FOLLOW_LR],
    # The same H=1 rows with the small tensors whole and a denser spec: what ~0.8 % more of
    # dense's bytes buys.
    "update H=1, small whole": update_row(UPDATE_SPEC, 1),
    "update H=1 LocalAdamW blocks, small whole": update_row(BLOCK_SMALL_WHOLE_SPEC, 1),
}
# In update mode each rank's Adam normalises its own noisier gradient and the average of the
# ranks' updates is shorter: the update rows raise AdamW's learning rate (by 2x at 2 ranks, as
# measured on a tuning task; see deepreduce.optim). SGD needs no change.
UPDATE_ADAM_LR_SCALE = 2.0
# Rows that run with these optimizers only, replaced as given (at the data-parallel learning rate).
# deepreduce.LocalAdamW steps as data-parallel AdamW would (no learning-rate factor).
ROW_OPTIMIZER = {"update H=1, bytes follow lr": {"sgd": "sgd"},
                 "update H=1 LocalAdamW": {"adamw": "local-adamw"},
                 "update H=1 LocalAdamW blocks": {"adamw": "local-adamw"},
                 "update H=1 LocalAdamW blocks, ahead 1.5": {"adamw": "local-adamw"},
                 "update H=1 LocalAdamW blocks, ahead 1.5, one top-k": {"adamw": "local-adamw"},
                 "update H=1 LocalAdamW blocks, bytes follow lr": {"adamw": "local-adamw"},
                 "update H=1 LocalAdamW tracked blocks, ahead 1.5, bytes follow lr": {"adamw": "local-adamw"},
                 "update H=1 LocalAdamW blocks, small whole": {"adamw": "local-adamw"}}
# DGC's momentum correction moves SGD's momentum into the hook (the optimizer then runs without).
RECIPE_EXTRA = {"sgd": ["--momentum-correction", "0.9"], "adamw": []}
TASKS: dict[str, list[str]] = {
    "lm": ["--task", "lm", "--d-model", "128", "--layers", "2", "--heads", "4", "--seq-len", "64", "--batch", "8",
           "--corpus-mb", "4"],
    "classify": ["--task", "classify"],  # its defaults: a 1-D conv net, 16 classes, 256-byte snippets
}
OPTIMIZERS: dict[str, dict[str, list[str]]] = {
    "lm": {"adamw": ["--optimizer", "adamw", "--lr", "4.2e-3", "--weight-decay", "0.01"],
           "sgd": ["--optimizer", "sgd", "--lr", "0.3"]},
    "classify": {"adamw": ["--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "0.1"],
                 "sgd": ["--optimizer", "sgd", "--lr", "0.05"]},
}
METRICS = {"lm": ("val_loss", "validation loss", False), "classify": ("val_acc", "validation accuracy", True)}
COMMON = ["--threads", "1", "--start-iter", "10", "--log-every", "0", "--quiet"]
QUICK_TASK = ["--task", "lm", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4",
              "--corpus-mb", "1", "--eval-batches", "2"]


def _torchrun(args: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "deepreduce", "train", *args]


def _run(cmd_or_procs, metrics: Path, log: Path, progress, task, timeout: float) -> tuple[list[dict], dict]:
    procs = cmd_or_procs
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            progress.update(task, completed=len(read_metrics(metrics)[0]))
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    records, summary = read_metrics(metrics)
    if summary is None:
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"{' '.join(procs[0].args) if hasattr(procs[0], 'args') else ''}: training did not finish "
                           f"(exit codes {[p.returncode for p in procs]}):\n{tail}")
    return records, summary


def train_run(key: dict, train_args: list[str], scratch: Path, port: int, progress, timeout: float) -> dict:
    """One loopback training run; its evaluation curve and bytes."""
    name = f"{key['task']}-{key['optimizer']}-{key['row']}-s{key['seed']}".replace(" ", "_").replace("%", "pct").replace("=", "")
    metrics, log = scratch / f"{name}.jsonl", scratch / f"{name}.log"
    metrics.unlink(missing_ok=True)
    task = progress.add_task(f"{key['task']:<8} {key['optimizer']:<5} s{key['seed']} {key['row']:<26}", total=key["steps"])
    with open(log, "w") as out:
        procs = [subprocess.Popen(_torchrun(train_args + ["--metrics", str(metrics)], port), stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})]
    records, summary = _run(procs, metrics, log, progress, task, timeout)
    metric = METRICS[key["task"]][0]
    curve = [{"step": r["step"], "value": r[metric]} for r in records if metric in r]
    steady = [r["bytes_sent"] for r in records if r["step"] > dense_steps(train_args)]
    return dict(key, train_args=train_args, final=summary[metric], curve=curve,
                bytes_per_step=statistics.fmean(steady) if steady else 0.0,
                dense_bytes_per_step=summary["dense_bytes_per_step"], train_s=sum(r["step_s"] for r in records))


def dense_steps(train_args: list[str]) -> int:
    """Steps that go dense before compression starts: 10, rounded up to whole exchanges."""
    local = int(train_args[train_args.index("--local-steps") + 1]) if "--local-steps" in train_args else 1
    return -(-10 // local) * local


def warm_steps(train_args: list[str]) -> int:
    """Steps before compression reaches its steady density: the dense steps plus a density warm-up."""
    ramp = int(train_args[train_args.index("--density-warmup") + 1]) if "--density-warmup" in train_args else 0
    return dense_steps(train_args) + ramp


def timing_run(task_name: str, row: str, train_args: list[str], steps: int, cluster, scratch: Path, port: int,
               progress, timeout: float) -> dict:
    """Step time of one configuration on the emulated link: dense warm-up and compressed steps apart."""
    warm_count = warm_steps(train_args)
    steps += warm_count
    name = f"timing-{task_name}-{row}".replace(" ", "_").replace("%", "pct").replace("=", "")
    metrics = scratch / f"{name}.jsonl"
    metrics.unlink(missing_ok=True)
    args = ["-m", "deepreduce", "train", *train_args, "--steps", str(steps), "--eval-every", "0", "--metrics", str(metrics)]
    task = progress.add_task(f"timing {task_name:<8} {row:<26}", total=steps)
    procs = []
    for node in range(cluster.nodes):
        with open(scratch / f"{name}.node{node}.log", "w") as out:
            procs.append(cluster.popen(node, cluster.torchrun_argv(node, args, port=port), env={"OMP_NUM_THREADS": "1"},
                                       port=port, stdout=out, stderr=subprocess.STDOUT))
    records, _ = _run(procs, metrics, scratch / f"{name}.node0.log", progress, task, timeout)
    warm = [r["step_s"] for r in records if r["step"] <= warm_count]
    steady = [r["step_s"] for r in records if r["step"] > warm_count]
    return {"task": task_name, "row": row, "link": cluster.rate, "warm_step_s": statistics.fmean(warm),
            "step_s": statistics.fmean(steady), "steps": steps, "warm_steps": warm_count,
            "warm_times": [r["step_s"] for r in records if r["step"] <= warm_count]}


# --- analysis --------------------------------------------------------------------------------------


def reached(curve: list[dict], target: float, higher: bool) -> int | None:
    """First evaluated step whose metric is at least as good as ``target``."""
    return next((p["step"] for p in curve if (p["value"] >= target if higher else p["value"] <= target)), None)


def seconds_to(step: int | None, timing: dict | None) -> float | None:
    """Link time of the first ``step`` steps: the warm-up steps as measured one by one (dense
    steps, a density ramp), then the steady mean."""
    if step is None or timing is None:
        return None
    warm = timing.get("warm_times") or [timing["warm_step_s"]] * timing.get("warm_steps", 10)
    return sum(warm[:step]) + max(step - len(warm), 0) * timing["step_s"]


def summarize(runs: list[dict], timings: list[dict]) -> list[dict]:
    """One row per (task, optimizer, configuration), seeds combined. Each seed is compared
    with dense of the same seed (same initialisation and data), then the comparisons are
    averaged: seeds differ more from each other than configurations do."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["optimizer"], run["row"]), []).append(run)
    for (task, optimizer, row), group in groups.items():
        higher = METRICS[task][2]
        dense = {r["seed"]: r["final"] for r in groups.get((task, optimizer, "dense"), [])}
        paired = [r for r in group if r["seed"] in dense]
        finals = [r["final"] for r in group]
        gaps = [((dense[r["seed"]] - r["final"]) if higher else (r["final"] - dense[r["seed"]])) / abs(dense[r["seed"]])
                for r in paired]
        timing = next((t for t in timings if t["task"] == task and t["row"] == row), None)
        steps = [reached(r["curve"], dense[r["seed"]], higher) for r in paired]
        got = [s for s in steps if s is not None]
        step_to = statistics.fmean(got) if got and len(got) == len(steps) else None
        out.append({
            "task": task, "optimizer": optimizer, "row": row, "seeds": len(group), "final": statistics.fmean(finals),
            "final_min": min(finals), "final_max": max(finals),
            "target": statistics.fmean(dense.values()) if dense else None,
            "gap": statistics.fmean(gaps) if gaps else None,
            "gap_min": min(gaps) if gaps else None, "gap_max": max(gaps) if gaps else None,
            "bytes_per_step": statistics.fmean(r["bytes_per_step"] for r in group),
            "dense_bytes_per_step": group[0]["dense_bytes_per_step"],
            "steps_to_target": step_to, "reached": f"{len(got)}/{len(steps)}",
            "step_s_link": timing["step_s"] if timing else None, "link": timing["link"] if timing else None,
            "time_to_target_s": seconds_to(round(step_to) if step_to is not None else None, timing),
        })
    order = list(ROWS)
    return sorted(out, key=lambda r: (r["task"], r["optimizer"], order.index(r["row"]) if r["row"] in order else 99))


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def _gap(row: dict) -> str:
    if row["gap"] is None:
        return "-"
    spread = f" ({100 * row['gap_min']:+.1f} to {100 * row['gap_max']:+.1f})" if row["seeds"] > 1 else ""
    return f"{100 * row['gap']:+.1f} %{spread}"


def render(summary: list[dict], facts: dict, command: str, steps: int, seeds: list[int], target_steps: int | None = None) -> str:
    longer = target_steps is not None and target_steps != steps
    trains = (f"Dense trains {target_steps} steps and sets the target; every other row trains {steps} steps (its "
              f"learning-rate schedule stretched to them), its gap measured at its last step" if longer
              else f"Each row trains {steps} steps")
    lines = [
        "## Convergence: longer runs to dense's final metric" if longer
        else "## Convergence: learning as well as dense, and the time to get there",
        "",
        f"Reproduce: `{command}`. Machine: {facts['cpu_cores']} cores, torch {facts['torch']}. {trains} "
        f"on 2 ranks (gloo, 1 thread each) from the same seed and data; seeds {', '.join(map(str, seeds))}. "
        "Compressed rows start after 10 dense steps. Bytes/step: mean bytes a rank hands to collectives per step after "
        "those 10 steps (the update mode's exchanges spread over their local steps; a density warm-up and the update "
        "mode's final dense flush included). Each seed is compared with dense of the same seed (seeds differ more "
        "from each other than configurations do). Gap: relative to that dense run's final metric (positive = worse), "
        "mean over seeds, range in brackets. Steps to target: first evaluation at or past that dense run's final "
        "metric, mean over seeds (`-` unless every seed got there). Time to target: those steps at the step time measured "
        "on 2 emulated nodes joined by the link (the dense steps and any density warm-up timed step by step, then the "
        "mean of 64 compressed steps); evaluation excluded.",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in summary):
        for optimizer in dict.fromkeys(r["optimizer"] for r in summary if r["task"] == task):
            rows = [r for r in summary if r["task"] == task and r["optimizer"] == optimizer]
            metric_name = METRICS[task][1]
            link = next((r["link"] for r in rows if r["link"]), None)
            dense_time = next((r["time_to_target_s"] for r in rows if r["row"] == "dense"), None)
            header = ["configuration", f"final {metric_name} (min-max)", "gap to dense", "bytes/step",
                      "steps to target", f"step time at {link or '-'}", "time to target", "vs dense"]
            table = []
            for r in rows:
                speedup = dense_time / r["time_to_target_s"] if dense_time and r["time_to_target_s"] else None
                table.append([
                    r["row"], f"{r['final']:.4f} ({r['final_min']:.4f}-{r['final_max']:.4f})",
                    _gap(r),
                    f"{r['bytes_per_step'] / 1e3:.1f} kB ({100 * r['bytes_per_step'] / r['dense_bytes_per_step']:.2f} %)",
                    _fmt(r["steps_to_target"], ".0f") + f" ({r['reached']})",
                    _fmt(r["step_s_link"], ".3f") + (" s" if r["step_s_link"] is not None else ""),
                    _fmt(r["time_to_target_s"], ".0f") + (" s" if r["time_to_target_s"] is not None else ""),
                    _fmt(speedup, ".1f") + ("x" if speedup else ""),
                ])
            heading = f"### {task}, {optimizer}" + (f", {steps} steps against dense's {target_steps}" if longer else "")
            lines += [heading, "", markdown_table(header, table), ""]
    lines += [f"![curves](results/{plot_name(longer)})", ""]
    return "\n".join(lines)


def plot_name(longer: bool) -> str:
    return "convergence_longer.png" if longer else "convergence.png"


def plot(runs: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["task"], r["optimizer"]) for r in runs))
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for col, (task, optimizer) in enumerate(panels):
        by_step, by_time = axes[0][col], axes[1][col]
        for number, row in enumerate(ROWS):
            group = [r for r in runs if (r["task"], r["optimizer"], r["row"]) == (task, optimizer, row)]
            if not group:
                continue
            steps = [p["step"] for p in group[0]["curve"]]
            values = [[p["value"] for p in r["curve"]] for r in group if len(r["curve"]) == len(steps)]
            mean = [statistics.fmean(v) for v in zip(*values)]
            # tab20: a distinct colour for each of the (more than 10) rows.
            line, = by_step.plot(steps, mean, label=row, linewidth=1.2, color=plt.get_cmap("tab20")(number % 20))
            by_step.fill_between(steps, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)],
                                 color=line.get_color(), alpha=0.15)
            stats = next(s for s in summary if (s["task"], s["optimizer"], s["row"]) == (task, optimizer, row))
            if stats["step_s_link"] is not None:
                timing = {"warm_step_s": stats["warm_step_s"], "step_s": stats["step_s_link"],
                          "warm_steps": stats["warm_steps"], "warm_times": stats["warm_times"]}
                by_time.plot([seconds_to(s, timing) for s in steps], mean, label=row, color=line.get_color(), linewidth=1.2)
        name = METRICS[task][1]
        by_step.set(title=f"{task}, {optimizer}", xlabel="step", ylabel=name)
        by_time.set(xlabel=f"estimated wall-clock (s) at {summary[0].get('link') or '-'}", ylabel=name, xscale="log")
        for ax in (by_step, by_time):
            ax.grid(alpha=0.3)
        if task == "lm":
            lows = [p["value"] for r in runs if r["task"] == task for p in r["curve"]]
            by_step.set_ylim(min(lows) * 0.98, min(lows) * 1.6)
            by_time.set_ylim(min(lows) * 0.98, min(lows) * 1.6)
    legend: dict[str, Any] = {}  # every row of every panel, once (panels may show different rows)
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = sorted(legend, key=lambda label: list(ROWS).index(label) if label in ROWS else len(ROWS))
    handles = [legend[label] for label in labels]
    # Below the panels, so that no curve is hidden behind it.
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("2 ranks; mean over seeds, shaded: min-max")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="deepreduce bench convergence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), metavar="ROW",
                        # argparse expands %-formats in help: the rows' "1%" must be escaped
                        help=f"configurations (default: all of {', '.join(r for r in ROWS if r != LONGER_DENSE)}; "
                             f"with --target-steps also '{LONGER_DENSE}')".replace("%", "%%"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--target-steps", type=int, default=None,
                        help="dense trains this many steps and sets the target; the other rows train --steps "
                             "(default: --steps; a different value writes the 'longer runs' section)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--link", default="100mbit", help="rate of the emulated link for the step times, or 'none'")
    parser.add_argument("--timing-steps", type=int, default=64,
                        help="compressed steps of each timing run (after its dense warm-up steps)")
    parser.add_argument("--retime", nargs="*", default=None, choices=list(ROWS), metavar="ROW",
                        help="time these rows again (no names: every selected row) although stored timings match "
                             "their settings; step times on a shared machine drift from one period to another, so "
                             "re-time the rows you compare together")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, 2 rows, no link (a smoke test)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is stopped")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the checkout's benchmarks/)")
    args = parser.parse_args(argv)
    check_link_rate(parser, "--link", args.link, "none")
    if args.target_steps is None:
        args.target_steps = args.steps
    if not 0 < args.target_steps <= args.steps:
        parser.error(f"--target-steps must be between 1 and --steps ({args.steps}), got {args.target_steps}")
    longer = args.target_steps != args.steps
    if args.rows is None:
        args.rows = [r for r in ROWS if longer or r != LONGER_DENSE]
    elif LONGER_DENSE in args.rows and not longer:
        parser.error(f"row '{LONGER_DENSE}' needs --target-steps below --steps")
    if longer and "dense" not in args.rows:
        parser.error("--target-steps needs the dense row (it sets the target)")
    retime = set(args.rows if args.retime == [] else args.retime or [])
    if retime - set(args.rows):
        parser.error(f"--retime names rows that are not selected: {', '.join(sorted(retime - set(args.rows)))}")
    console = make_console()
    if args.quick:
        args.tasks, args.optimizers, args.seeds, args.link = ["lm"], ["adamw"], [0], "none"
        args.rows = [r for r in args.rows if r in ("dense", "update H=4")] if len(args.rows) < len(ROWS) else ["dense", "update H=4"]
        if not args.rows:
            parser.error("--quick runs the rows 'dense' and 'update H=4' only; --rows selects neither")
        args.steps = min(args.steps, 30 if longer else 20)
        args.target_steps = min(args.target_steps, args.steps if not longer else 20)
        args.eval_every = 5
    out = output_dir(args.out, args.quick)
    scratch = Path(tempfile.mkdtemp(prefix="deepreduce-convergence-runs-"))
    json_path = out / "results" / "convergence.json"
    stored = json.loads(json_path.read_text()) if json_path.exists() else {}
    stored = stored if isinstance(stored, dict) else {}
    runs: list[dict] = stored.get("runs", [])
    timings: list[dict] = stored.get("timings", [])

    def steps_of(row: str) -> int:
        return args.target_steps if row == "dense" else args.steps

    def arguments(task: str, optimizer: str, row: str, seed: int) -> list[str]:
        base = QUICK_TASK if args.quick else TASKS[task]
        extra = RECIPE_EXTRA[optimizer] if "DGC" in row else []
        optimizer_args = list(OPTIMIZERS[task][optimizer])
        if row in ROW_OPTIMIZER:
            optimizer_args[optimizer_args.index("--optimizer") + 1] = ROW_OPTIMIZER[row][optimizer]
        elif row.startswith("update") and optimizer == "adamw":
            where = optimizer_args.index("--lr") + 1
            optimizer_args[where] = f"{float(optimizer_args[where]) * UPDATE_ADAM_LR_SCALE:g}"
        return [*base, *optimizer_args, *COMMON, *ROWS[row], *extra, "--seed", str(seed),
                "--steps", str(steps_of(row)), "--eval-every", str(args.eval_every)]

    def save() -> None:
        write_json(json_path, {"runs": runs, "timings": timings, "machine": machine_facts()})

    port = 29600 + os.getpid() % 200
    with progress_bar(console) as progress:
        if args.link != "none":
            from ..netns import NetnsCluster, netns_unavailable_reason

            reason = netns_unavailable_reason()
            if reason:
                console.print(f"[red]--link needs network namespaces ({reason}); use --link none")
                return 2
            with NetnsCluster(2, rate=args.link, name=f"drcv{os.getpid() % 10000}") as cluster:
                for task in args.tasks:
                    for row in args.rows:
                        optimizer = next((o for o in args.optimizers if o in ROW_OPTIMIZER.get(row, {o: None})), None)
                        if optimizer is None:
                            continue
                        train_args = arguments(task, optimizer, row, 0)
                        train_args = train_args[: train_args.index("--steps")]
                        if row not in retime and any(t["task"] == task and t["row"] == row and t["link"] == args.link
                               and t.get("train_args") == train_args and t["steps"] - t["warm_steps"] == args.timing_steps
                               for t in timings):
                            continue
                        timing = timing_run(task, row, train_args, args.timing_steps, cluster, scratch, port, progress,
                                            args.timeout)
                        timings = [t for t in timings if not (t["task"] == task and t["row"] == row)]
                        timings.append(dict(timing, train_args=train_args))
                        save()
        for task in args.tasks:
            for optimizer in args.optimizers:
                for seed in args.seeds:
                    for row in args.rows:
                        if optimizer not in ROW_OPTIMIZER.get(row, {optimizer: None}):
                            continue  # a row for another optimizer
                        key = {"task": task, "optimizer": optimizer, "row": row, "seed": seed, "steps": steps_of(row)}
                        train_args = arguments(task, optimizer, row, seed)
                        if any(r.get("train_args") == train_args for r in runs):
                            continue  # stored from an earlier run with the same settings
                        runs = [r for r in runs if any(r[k] != v for k, v in key.items())]
                        runs.append(train_run(key, train_args, scratch, port, progress, args.timeout))
                        save()
    wanted = [r for r in runs if r["task"] in args.tasks and r["optimizer"] in args.optimizers and r["row"] in args.rows
              and r["seed"] in args.seeds and r["steps"] == steps_of(r["row"])]
    summary = summarize(wanted, [t for t in timings if t["link"] == args.link])
    for row in summary:
        timing = next((t for t in timings if t["task"] == row["task"] and t["row"] == row["row"] and t["link"] == args.link), None)
        row["warm_step_s"] = timing["warm_step_s"] if timing else None
        row["warm_steps"] = timing.get("warm_steps", 10) if timing else None
        row["warm_times"] = timing.get("warm_times") if timing else None
    facts = machine_facts()
    kept = {k: v for k, v in stored.items() if k in ("summary", "summary_longer")}
    write_json(json_path, {"runs": runs, "timings": timings, **kept,
                           "summary_longer" if longer else "summary": summary, "machine": facts})
    section = render(summary, facts, reproduce_command("convergence", argv), args.steps, args.seeds, args.target_steps)
    update_results_section(out / "RESULTS.md", "convergence-longer" if longer else "convergence", section)
    console.print(section, markup=False)  # markdown: its [links] are not rich markup
    try:
        plot(wanted, summary, out / "results" / plot_name(longer))
    except ImportError:
        console.print("[yellow]matplotlib not installed: no plot (pip install 'deepreduce[bench]')")
    console.print(f"wrote {out / 'RESULTS.md'}, {json_path}; run logs in {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convergence benchmark: does compression cost accuracy, and what does it buy in time?

Trains the byte-level transformer language model on the standard library's source text
(``deepreduce train``) with the same seed, data and number of steps under each
configuration on 2 ranks, and reports the final validation loss, bytes per step, and
the wall-clock time until the validation loss first reaches a target. With ``--link``
the two ranks sit on emulated nodes joined by a link of that rate (network namespaces,
``tc tbf``), so the time-to-target includes a real network's cost.

    deepreduce bench convergence                          # loopback, 400 steps
    deepreduce bench convergence --link 100mbit           # time to target over 100 Mbit/s
    deepreduce bench convergence --quick                  # a smoke test
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

from ..metrics import read_metrics
from . import default_output_dir, reproduce_command, make_console, progress_bar, machine_facts, markdown_table, update_results_section, write_json

CONFIGS = [
    "dense",
    "fp16",
    "powersgd",
    "topk:0.1/eliasfano/fp16",
    "topk:0.01/eliasfano/fp16",
    "topk:0.01/eliasfano/qsgd",
    "topk:0.01/bloom:policy=p2/polyfit",
]
MODEL_ARGS = ["--d-model", "192", "--layers", "3", "--heads", "4", "--seq-len", "128", "--batch", "16",
              "--lr", "3e-3", "--corpus-mb", "8", "--start-iter", "10"]
QUICK_ARGS = ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4",
              "--corpus-mb", "1", "--start-iter", "2", "--eval-batches", "2"]


def _launch(config: str, train_args: list[str], metrics: Path, log: Path, port: int, cluster) -> list[subprocess.Popen]:
    args = ["-m", "deepreduce", "train", *train_args, "--compression", config, "--metrics", str(metrics),
            "--log-every", "0", "--threads", "1"]
    env = {"OMP_NUM_THREADS": "1"}
    if cluster is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--master_port={port}", *args]
        with open(log, "w") as out:
            return [subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})]
    procs = []
    for node in range(cluster.nodes):
        with open(log.with_suffix(f".node{node}.log"), "w") as out:
            procs.append(cluster.popen(node, cluster.torchrun_argv(node, args, port=port), env=env, port=port,
                                       stdout=out, stderr=subprocess.STDOUT))
    return procs


def run_config(config: str, train_args: list[str], steps: int, out: Path, port: int, cluster, progress, task,
               timeout: float) -> dict:
    name = config.replace("/", "_").replace(":", "-")
    metrics, log = out / f"{name}.jsonl", out / f"{name}.log"
    metrics.unlink(missing_ok=True)
    procs = _launch(config, train_args, metrics, log, port, cluster)
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
        logs = sorted(out.glob(f"{name}*.log"))
        tail = logs[0].read_text()[-2000:] if logs else ""
        raise RuntimeError(f"{config}: training did not finish (exit codes {[p.returncode for p in procs]}):\n{tail}")
    elapsed = 0.0
    curve = []
    for record in records:
        elapsed += record["step_s"]
        if "val_loss" in record:
            curve.append({"step": record["step"], "wall_s": elapsed, "val_loss": record["val_loss"]})
    return {
        "config": config,
        "nodes": 2,
        "link": cluster.rate if cluster and cluster.rate else ("unshaped" if cluster else "loopback"),
        "steps": steps,
        "final_val_loss": summary["val_loss"],
        "step_time_s": statistics.median(r["step_s"] for r in records),
        "bytes_per_step": statistics.median(r["bytes_sent"] for r in records),
        "train_wall_s": elapsed,
        "train_args": train_args,
        "curve": curve,
    }


def merge_rows(previous: list[dict], rows: list[dict]) -> list[dict]:
    """This run's rows, plus stored rows of other configurations trained on the same link with
    the same settings (so one configuration can be added without re-running the rest)."""
    ran = {r["config"] for r in rows}
    link, train_args = rows[0]["link"], rows[0]["train_args"]
    kept = [r for r in previous if r.get("link") == link and r.get("train_args") == train_args and r["config"] not in ran]
    order = {config: i for i, config in enumerate(CONFIGS)}
    return sorted(kept + rows, key=lambda r: order.get(r["config"], len(order)))


def time_to_target(curve: list[dict], target: float) -> float | None:
    return next((point["wall_s"] for point in curve if point["val_loss"] <= target), None)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(rows: list[dict], target: float, common: float, facts: dict, train_args: list[str]) -> str:
    commands = " and ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    header = ["config", "link", "steps", "final val loss", "step time s", "bytes/step/rank", "time to target s",
              f"time to {common:.4f} s"]
    table = [[r["config"], r["link"], r["steps"], f"{r['final_val_loss']:.4f}", f"{r['step_time_s']:.3f}",
              f"{r['bytes_per_step'] / 1e6:.3f} MB", _seconds(r["time_to_target_s"]), _seconds(r["time_to_common_s"])]
             for r in rows]
    return "\n".join([
        "## Convergence: validation loss and time to target",
        "",
        f"Reproduce: {commands}. Machine: {facts['cpu_cores']} cores, torch {facts['torch']}. "
        f"Training: `deepreduce train {' '.join(train_args)}` on 2 ranks (gloo, 1 thread each), same seed and "
        f"data order for every configuration; compressed hooks start after 10 dense steps.",
        "",
        f"Target validation loss: {target:.4f} (the dense run's final loss + 2 %); {common:.4f} is the worst "
        "final loss of all configurations, a target every one of them reaches. Times count training step time "
        "only (evaluation excluded). Bytes/step: median bytes each rank hands to collectives.",
        "",
        markdown_table(header, table),
        "",
        "![validation loss](results/convergence.png)",
    ])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        steps = [p["step"] for p in row["curve"]]
        wall = [p["wall_s"] for p in row["curve"]]
        losses = [p["val_loss"] for p in row["curve"]]
        by_step.plot(steps, losses, marker=".", label=row["config"])
        by_time.plot(wall, losses, marker=".", label=row["config"])
    by_step.set_xlabel("step")
    by_time.set_xlabel(f"training wall-clock (s), link {rows[0]['link']}")
    for ax in (by_step, by_time):
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Byte-level transformer on stdlib source, 2 ranks")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="deepreduce bench convergence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, help=f"default: {' '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration (default 400)")
    parser.add_argument("--link", default=None, help="emulate 2 nodes on a link of this rate (e.g. 100mbit; needs root)")
    parser.add_argument("--target", type=float, default=None, help="target validation loss (default: dense final + 2 %%)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 20 steps, 2 configs (a smoke test)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration before it is stopped")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the checkout's benchmarks/)")
    args = parser.parse_args(argv)

    from rich.table import Table

    console = make_console()
    steps = args.steps or (20 if args.quick else 400)
    configs = args.configs or (["dense", "topk:0.05/eliasfano/fp16"] if args.quick else CONFIGS)
    from .bandwidth import available

    skipped = [c for c in configs if c not in ("dense", "fp16", "powersgd") and not available(c)]
    if skipped:
        console.print(f"[yellow]skipping configurations whose codecs are not registered: {', '.join(skipped)}")
        configs = [c for c in configs if c not in skipped]
    train_args = (QUICK_ARGS if args.quick else MODEL_ARGS) + ["--steps", str(steps), "--eval-every", str(max(1, steps // 20))]
    out = args.out or (Path(tempfile.mkdtemp(prefix="deepreduce-bench-")) if args.quick else default_output_dir())
    scratch = Path(tempfile.mkdtemp(prefix="deepreduce-convergence-runs-"))
    cluster = None
    if args.link:
        from ..netns import NetnsCluster, netns_unavailable_reason

        reason = netns_unavailable_reason()
        if reason:
            console.print(f"[red]--link needs network namespaces: {reason}")
            return 2
        cluster = NetnsCluster(2, rate=None if args.link == "unshaped" else args.link, name=f"drcv{os.getpid() % 10000}")
        cluster.up()
    rows = []
    try:
        with progress_bar(console) as progress:
            for i, config in enumerate(configs):
                task = progress.add_task(f"{config:<36}", total=steps)
                rows.append(run_config(config, train_args, steps, scratch, 29700 + i, cluster, progress, task, args.timeout))
    finally:
        if cluster is not None:
            cluster.down()
    # One JSON for every link and configuration: stored rows of other runs are kept.
    json_path = out / "results" / "convergence.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else []
    command = reproduce_command("convergence", argv)
    rows = merge_rows(previous, [dict(r, command=command) for r in rows])
    dense = next((r for r in rows if r["config"] == "dense"), None)
    target = args.target if args.target is not None else (dense or rows[0])["final_val_loss"] * 1.02
    common = max(r["final_val_loss"] for r in rows)
    for row in rows:
        row["target_val_loss"] = target
        row["time_to_target_s"] = time_to_target(row["curve"], target)
        row["common_val_loss"] = common
        row["time_to_common_s"] = time_to_target(row["curve"], common)

    table = Table(title=f"deepreduce bench convergence ({steps} steps, target val loss {target:.4f})")
    for column in ("config", "link", "final val loss", "step s", "bytes/step", "time to target s", f"time to {common:.4f} s"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["config"], r["link"], f"{r['final_val_loss']:.4f}", f"{r['step_time_s']:.3f}",
                      f"{r['bytes_per_step'] / 1e6:.3f} MB", _seconds(r["time_to_target_s"]), _seconds(r["time_to_common_s"]))
    console.print(table)
    facts = machine_facts()
    links = {r["link"] for r in rows}
    others = [r for r in previous if r.get("link") not in links]
    write_json(json_path, others + [dict(r, machine=r.get("machine", facts)) for r in rows])
    section = "convergence" + (f"-{rows[0]['link']}" if args.link else "")
    update_results_section(out / "RESULTS.md", section, render(rows, target, common, facts, train_args).replace(
        "results/convergence.png", f"results/{section}.png"))
    try:
        plot(rows, out / "results" / f"{section}.png")
    except ImportError:
        console.print("[yellow]matplotlib not installed: no plot (pip install 'deepreduce[bench]')")
    console.print(f"wrote {out / 'RESULTS.md'}, {out / 'results' / 'convergence.json'}; run logs in {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bandwidth benchmark: DDP step time on emulated links, deepreduce vs. the built-in hooks.

N nodes (network namespaces on a private bridge, ``tc tbf`` at both ends of every link)
each run one DDP rank of a model with ResNet-50's parameter layout (161 tensors,
25.6 M parameters, DDP's default 25 MB buckets). The compute is deliberately cheap
(each parameter's gradient is a fixed random tensor of its shape), so the step time is
communication plus the hook's own work, as on a real cluster whose network is the
bottleneck.

Per configuration: median step time, communication time (step time minus the
``noop`` configuration's, which communicates nothing), bytes on the wire per step per
rank (the transmit counter of the node's interface: payloads, framing and protocol
overhead, counted by the kernel), and speed-up vs. the default allreduce.

    deepreduce bench bandwidth                           # 2 and 4 nodes x {100mbit, 1gbit, unshaped}
    deepreduce bench bandwidth --nodes 2 --links 100mbit --configs dense topk:0.01/eliasfano/fp16
    deepreduce bench bandwidth --quick                   # smoke test: tiny model, 2 nodes, unshaped (30-60 s)

``powersgd`` is torch's ``powerSGD_hook`` (rank 4) wrapped so that each bucket's future
has completed when the hook returns: the stock hook issues collectives from future
callbacks, which aborts or hangs gloo with several buckets. Its warm-up
(``start_powerSGD_iter``) is cut to 2 steps here because only steps after it are timed.
Needs root (network namespaces) and iproute2.
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

import torch

from . import default_output_dir, reproduce_command, make_console, progress_bar, machine_facts, markdown_table, update_results_section, write_json

BASELINES = ["noop", "dense", "fp16", "powersgd"]
DEEPREDUCE = [
    "topk:0.01/eliasfano/fp16",
    "topk:0.01/eliasfano/qsgd",
    "topk:0.01/bloom:policy=p0/qsgd",
    "mstopk:0.01/eliasfano/fp16",
    "topk:0.001/eliasfano/fp16",
]
LINKS = ["100mbit", "1gbit", "unshaped"]
# With several processes per node (--procs-per-node): the schemes side by side. A config
# "SPEC@SCHEME" runs the compressor SPEC with the engine's scheme SCHEME.
TOPOLOGY_CONFIGS = [
    "noop", "dense", "powersgd",
    "topk:0.01/eliasfano/fp16",
    "topk:0.01/eliasfano/fp16@hierarchical",
    "topk:0.01/eliasfano/fp16@shared_index",
]
TOPOLOGY_LINKS = ["100mbit", "1gbit"]
WARMUP_STEPS = 3  # DDP rebuilds buckets after step 1; hooks start compressing at step 2


# --- the per-rank worker (runs inside a namespace, under torchrun) --------------------------


def resnet_shapes(quick: bool) -> list[torch.Size]:
    from ..models import resnet

    if quick:
        return [torch.Size([64, 64, 3, 3])] * 4 + [torch.Size([256, 64])]
    # ResNet-50 with 1000 classes: 25.56 M parameters in 161 tensors (+ the byte embedding
    # of this package's variant, which is left out).
    model = resnet("resnet50", num_classes=1000)
    return [p.shape for name, p in model.named_parameters() if not name.startswith("embed")]


class LayoutModel(torch.nn.Module):
    """Parameters of the given shapes; the loss is ``sum(p * g)``, so each gradient is ``g``.

    ``g`` is a fixed random tensor per parameter and rank: the communication sees real
    bucket sizes and a dense, varied gradient, while the compute costs two cheap passes."""

    def __init__(self, shapes: list[torch.Size], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s)) for s in shapes)
        self.directions = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    def forward(self) -> torch.Tensor:
        return sum((w * g).sum() for w, g in zip(self.weights, self.directions))


def _tx_bytes(ifname: str) -> int | None:
    path = Path(f"/sys/class/net/{ifname}/statistics/tx_bytes")
    return int(path.read_text()) if path.exists() else None


def worker(argv: list[str]) -> int:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ...comm.torch_dist import close_process_group
    from ..comm_hooks import make_hook
    from ..metrics import params_digest

    parser = argparse.ArgumentParser(prog="bandwidth worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    hook_name, scheme = split_config(args.config)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = LayoutModel(resnet_shapes(args.quick), seed=1000 + rank)
    ddp = DDP(model)
    state = None
    if hook_name == "noop":
        ddp.register_comm_hook(None, debugging_hooks.noop_hook)
        meter = None
    else:
        options = {} if scheme is None else {"scheme": scheme}
        state, hook, meter, _ = make_hook(hook_name, seed=0, start_iter=2, min_numel=1024, **options)
        ddp.register_comm_hook(state, hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "eth0")
    step_s, comm_s, tx = [], [], []
    for step in range(WARMUP_STEPS + args.steps):
        dist.barrier()  # every rank starts the step together: step times are comparable
        before = _tx_bytes(ifname)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        ddp().backward()
        optimizer.step()
        elapsed = time.perf_counter() - began
        after = _tx_bytes(ifname)
        in_flight = meter.take()[1] if meter else 0.0
        if step >= WARMUP_STEPS:
            step_s.append(elapsed)
            comm_s.append(in_flight)
            tx.append(after - before if before is not None and after is not None else None)
    digest = params_digest(model)
    hook_stats = state.stats()["steady"] if hasattr(state, "engine") else None  # deepreduce hooks: the timed phase
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "config": args.config, "step_s": step_s, "hook_in_flight_s": comm_s,
        "tx_bytes": tx, "params_digest": digest, "hook_stats": hook_stats,
    }))
    close_process_group()
    return 0


# --- the orchestrator -------------------------------------------------------------------------


def _link_rate(link: str) -> str | None:
    return None if link == "unshaped" else link


def run_config(cluster, config: str, steps: int, out: Path, port: int, threads: int, quick: bool, timeout: float) -> dict:
    run_dir = out / (f"{cluster.nodes}x{cluster.procs_per_node}n-{cluster.rate or 'unshaped'}-"
                     f"{config.replace('/', '_').replace(':', '-').replace('@', '-at-')}")
    for stale in run_dir.glob("rank*.json"):
        stale.unlink()
    command = ["-m", "deepreduce.apps.bench.bandwidth", "--worker", "--config", config, "--steps", str(steps),
               "--out", str(run_dir), "--threads", str(threads)] + (["--quick"] if quick else [])
    logs = []
    procs = []
    for node in range(cluster.nodes):
        log = open(run_dir.parent / f"{run_dir.name}.node{node}.log", "w")
        logs.append(log)
        argv = cluster.torchrun_argv(node, command, port=port)  # --nproc_per_node: cluster.procs_per_node
        procs.append(cluster.popen(node, argv, port=port, env={"OMP_NUM_THREADS": str(threads)}, stdout=log, stderr=subprocess.STDOUT))
    codes = cluster.wait(procs, timeout=timeout)
    for log in logs:
        log.close()
    reports = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    if any(codes) or len(reports) != cluster.nodes * cluster.procs_per_node:
        tail = (run_dir.parent / f"{run_dir.name}.node0.log").read_text()[-1500:]
        raise RuntimeError(f"{config} on {cluster.nodes} nodes ({cluster.rate or 'unshaped'}) failed with exit codes {codes}:\n{tail}")
    step_times = [statistics.median(r["step_s"]) for r in reports]
    # The counter is the node's interface: what the node's processes sent to other nodes
    # (their traffic inside the node goes over loopback). Per rank: a share of it.
    tx = [b / cluster.procs_per_node for r in reports for b in r["tx_bytes"] if b is not None]
    stats = [r["hook_stats"] for r in reports if r.get("hook_stats")]
    return {
        "config": config,
        "nodes": cluster.nodes,
        "procs_per_node": cluster.procs_per_node,
        "hook_stats": stats[0] if stats else None,  # rank 0's counters over the timed steps
        "link": cluster.rate or "unshaped",
        "step_time_s": max(step_times),  # the slowest rank sets the pace
        "hook_in_flight_s": statistics.median(statistics.median(r["hook_in_flight_s"]) for r in reports),
        "bytes_per_step": statistics.fmean(tx) if tx else None,
        "steps_timed": steps,
        # Bitwise-equal parameters on every rank (not expected of `noop`, which does not communicate).
        "params_agree": len({r["params_digest"] for r in reports}) == 1,
    }


def split_config(config: str) -> tuple[str, str | None]:
    """``"SPEC@SCHEME"`` -> (SPEC, SCHEME); a config without ``@`` -> (config, None)."""
    hook, _, scheme = config.partition("@")
    return hook, scheme or None


def unavailable(config: str) -> str | None:
    """Why ``config`` cannot run with this build (unknown codec or scheme), or None."""
    from ... import Compressor
    from ...engine.pipeline import SCHEMES
    from ...errors import ConfigError

    hook, scheme = split_config(config)
    if scheme is not None:
        if hook in BASELINES:
            return f"{hook} is a built-in hook: it has no scheme"
        if scheme not in SCHEMES:
            return f"the engine has no scheme {scheme!r} (it knows {', '.join(SCHEMES)})"
    if hook in BASELINES:
        return None
    try:
        Compressor.from_spec(hook)
    except ConfigError as error:
        return str(error)
    return None


def available(config: str) -> bool:
    return unavailable(config) is None


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _fmt_speedup(row: dict) -> str:
    if row["config"] == "noop":
        return "(reference)"  # the compute alone: no communication, so no speed-up to claim
    return f"{row['speedup_vs_dense']:.2f}x" if row.get("speedup_vs_dense") else "-"


def render(rows: list[dict], facts: dict, command: str) -> str:
    header = ["nodes", "link", "config", "step time s", "comm time s", "wire bytes/step/rank", "speed-up vs dense"]
    table = [[r["nodes"], r["link"], r["config"], f"{r['step_time_s']:.3f}", f"{r['comm_time_s']:.3f}",
              _fmt_bytes(r["bytes_per_step"]), _fmt_speedup(r)]
             for r in rows]
    return "\n".join([
        "## Bandwidth: DDP step time on emulated links",
        "",
        f"Reproduce: `{command}` (as root). Machine: {facts['cpu_cores']} cores, torch {facts['torch']}, "
        "each node a network namespace on a private bridge with `tc tbf` at both ends of its link.",
        "",
        "Model: ResNet-50's 161 parameter tensors (25.6 M parameters), DDP default 25 MB buckets, cheap "
        "compute (fixed random gradients), gloo. Step time: median over the timed steps of the slowest rank, "
        "after 3 warm-up steps. Comm time: step time minus the `noop` hook's (which communicates nothing, so "
        "its ranks do not train together: it is the compute-only reference, with no speed-up of its own). "
        "Wire bytes: the node interface's transmit counter per step (payloads plus TCP/IP framing). "
        "`powersgd` is torch's powerSGD_hook (rank 4), wrapped so every bucket completes before the hook "
        "returns (the stock hook hangs gloo with several buckets), warm-up cut to 2 steps.",
        "",
        markdown_table(header, table),
        "",
        "![step time vs. link rate](results/bandwidth.png)",
    ])


def render_topology(rows: list[dict], facts: dict, command: str, skipped: dict[str, str]) -> str:
    L = rows[0]["procs_per_node"]
    header = ["nodes x procs", "link", "config", "step time s", "comm time s", "inter-node bytes/step/rank",
              "vs dense", "vs powersgd"]
    table = [[f"{r['nodes']} x {r['procs_per_node']}", r["link"], r["config"], f"{r['step_time_s']:.3f}",
              f"{r['comm_time_s']:.3f}", _fmt_bytes(r["bytes_per_step"]), _fmt_speedup(r),
              "-" if not r.get("speedup_vs_powersgd") else f"{r['speedup_vs_powersgd']:.2f}x"] for r in rows]
    notes = [f"- `{config}` was not run: {why}." for config, why in skipped.items()]
    return "\n".join([
        f"## Bandwidth with {L} processes per node: hierarchical vs. flat",
        "",
        f"Reproduce: `{command}` (as root). Machine: {facts['cpu_cores']} cores shared by every process of every "
        f"node (and, during this run, by other jobs), torch {facts['torch']}. Each node is a network namespace with "
        f"{L} DDP processes talking over its loopback; only traffic between nodes crosses the `tc tbf`-shaped link.",
        "",
        "Model, steps and `powersgd` as in the section above. Inter-node bytes: the node interface's transmit counter "
        f"per step divided by {L} (payloads plus TCP/IP framing). `SPEC@hierarchical` is the engine's "
        "`scheme=\"hierarchical\"`: a dense reduce-scatter inside the node, top-k of 1/L of each bucket exchanged "
        "between nodes, a dense all-gather inside the node. The plain SPEC is the flat all-gather over all ranks.",
        "",
        markdown_table(header, table),
        "",
        *notes,
        "",
        "![step time vs. link rate](results/bandwidth_topology.png)",
    ])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    node_counts = sorted({r["nodes"] for r in rows})
    rate_bits = {"100mbit": 1e8, "1gbit": 1e9, "unshaped": 1e10}
    fig, axes = plt.subplots(1, len(node_counts), figsize=(6 * len(node_counts), 5.2), squeeze=False)
    for ax, nodes in zip(axes[0], node_counts):
        for config in dict.fromkeys(r["config"] for r in rows if r["nodes"] == nodes):
            points = sorted((rate_bits.get(r["link"], 1e10), r["step_time_s"]) for r in rows
                            if r["nodes"] == nodes and r["config"] == config)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1e8, 1e9, 1e10])
        ax.set_xticklabels(["100 Mbit/s", "1 Gbit/s", "unshaped"])
        ax.set_xlabel("link rate")
        ax.set_ylabel("median step time (s)")
        per_node = rows[0].get("procs_per_node", 1)
        ax.set_title(f"{nodes} nodes" + (f" x {per_node} processes" if per_node > 1 else "") + ", ResNet-50 layout (25.6 M)")
        ax.grid(True, which="both", alpha=0.3)
    # One legend below the panels: inside them it covered the slow configurations' lines.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 4) // 5), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_cost_model(out: Path, argv: list[str]) -> int:
    """The cost-model section of RESULTS.md, from the stored topology results."""
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(prog="deepreduce bench bandwidth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=None, help="node counts (default 2 4)")
    parser.add_argument("--procs-per-node", type=int, default=1,
                        help="DDP processes per node (they talk over the node's loopback; default 1). With more than "
                             "one, the defaults compare the schemes: " + " ".join(TOPOLOGY_CONFIGS))
    parser.add_argument("--links", nargs="+", default=None,
                        help="link rates: 100mbit 1gbit unshaped (default all; 100mbit 1gbit with --procs-per-node > 1)")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="noop dense fp16 powersgd and/or compressor specs, SPEC@SCHEME for an engine scheme "
                             f"(default: {' '.join(BASELINES + DEEPREDUCE)})")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3 at 100mbit, 5 otherwise)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 nodes, unshaped, 3 configurations of 2 steps (a smoke test: 30-60 s on 2 "
                             "cores, most of it starting 6 processes)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it is stopped")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the checkout's benchmarks/)")
    parser.add_argument("--cost-model", action="store_true",
                        help="only (re)write the cost-model section from the stored topology results")
    args = parser.parse_args(argv)
    if args.procs_per_node < 1:
        parser.error(f"--procs-per-node must be >= 1, got {args.procs_per_node}")
    topology = args.procs_per_node > 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="deepreduce-bench-")) if args.quick else default_output_dir())
    if args.cost_model:
        return write_cost_model(out, argv)

    from rich.table import Table

    from ..netns import NetnsCluster, netns_unavailable_reason

    console = make_console()
    reason = netns_unavailable_reason()
    if reason:
        console.print(f"[red]deepreduce bench bandwidth needs network namespaces: {reason}")
        return 2
    nodes = args.nodes or ([2] if args.quick else [2, 4])
    links = args.links or (["unshaped"] if args.quick else TOPOLOGY_LINKS if topology else LINKS)
    configs = args.configs or (["noop", "dense", "topk:0.01/eliasfano/fp16"] if args.quick
                               else TOPOLOGY_CONFIGS if topology else BASELINES + DEEPREDUCE)
    skipped = {c: unavailable(c) for c in configs if unavailable(c)}
    for config, why in skipped.items():
        console.print(f"[yellow]skipping {config}: {why}")
    configs = [c for c in configs if c not in skipped]
    if "noop" not in configs:
        configs = ["noop"] + configs  # the compute-only reference for comm time
    bad_links = [link for link in links if link != "unshaped" and not link[0].isdigit()]
    if bad_links:
        parser.error(f"unknown link rates {bad_links}: use e.g. 100mbit, 1gbit, unshaped")
    scratch = Path(tempfile.mkdtemp(prefix="deepreduce-bandwidth-runs-"))
    threads = 1
    rows: list[dict] = []
    port = 29600
    with progress_bar(console) as progress:
        task = progress.add_task("bandwidth", total=len(nodes) * len(links) * len(configs))
        for n in nodes:
            for link in links:
                with NetnsCluster(n, rate=_link_rate(link), name=f"drbw{os.getpid() % 10000}",
                                  procs_per_node=args.procs_per_node) as cluster:
                    for config in configs:
                        progress.update(task, description=f"{n}x{args.procs_per_node} {link:>8} {config}")
                        steps = args.steps or (2 if args.quick else 3 if link == "100mbit" else 5)
                        port += 1
                        rows.append(run_config(cluster, config, steps, scratch, port, threads, args.quick, args.timeout))
                        progress.advance(task)
    for row in rows:
        same = [r for r in rows if r["nodes"] == row["nodes"] and r["link"] == row["link"]]
        noop = next(r["step_time_s"] for r in same if r["config"] == "noop")
        dense = next((r["step_time_s"] for r in same if r["config"] == "dense"), None)
        powersgd = next((r["step_time_s"] for r in same if r["config"] == "powersgd"), None)
        row["comm_time_s"] = max(0.0, row["step_time_s"] - noop)
        # noop communicates nothing: it times the compute, it is not a way to train faster.
        row["speedup_vs_dense"] = dense / row["step_time_s"] if dense and row["config"] != "noop" else None
        row["speedup_vs_powersgd"] = powersgd / row["step_time_s"] if powersgd and row["config"] != "noop" else None

    table = Table(title="deepreduce bench bandwidth")
    for column in ("nodes", "procs/node", "link", "config", "step s", "comm s", "wire/step/rank", "vs dense"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["nodes"]), str(r["procs_per_node"]), r["link"], r["config"], f"{r['step_time_s']:.3f}",
                      f"{r['comm_time_s']:.3f}", _fmt_bytes(r["bytes_per_step"]), _fmt_speedup(r))
    console.print(table)
    facts = machine_facts()
    command = reproduce_command("bandwidth", argv)
    name = "bandwidth_topology" if topology else "bandwidth"
    write_json(out / "results" / f"{name}.json", [dict(r, **{"machine": facts}) for r in rows])
    if topology:
        update_results_section(out / "RESULTS.md", "bandwidth-topology", render_topology(rows, facts, command, skipped))
    else:
        update_results_section(out / "RESULTS.md", "bandwidth", render(rows, facts, command))
    try:
        plot(rows, out / "results" / f"{name}.png")
    except ImportError:
        console.print("[yellow]matplotlib not installed: no plot (pip install 'deepreduce[bench]')")
    console.print(f"wrote {out / 'RESULTS.md'}, {out / 'results' / (name + '.json')}; run logs in {scratch}")
    if topology:
        write_cost_model(out, argv)
    return 0


if __name__ == "__main__":
    from ...cli import exit_distributed_process

    code = main()
    if "--worker" in sys.argv[1:2]:
        exit_distributed_process(code)
    sys.exit(code)

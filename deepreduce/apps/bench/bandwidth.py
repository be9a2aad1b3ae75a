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

``auto`` is ``compressor="auto"`` (:mod:`deepreduce.engine.plan`): it plans at step 2,
inside the untimed warm-up, and each rank's report keeps the plan (bucket -> option).

``powersgd`` is torch's ``powerSGD_hook`` (rank 4) wrapped so that each bucket's future
has completed when the hook returns: the stock hook issues collectives from future
callbacks, which aborts or hangs gloo with several buckets. Its warm-up
(``start_powerSGD_iter``) is cut to 2 steps here because only steps after it are timed.
Needs root (network namespaces) and iproute2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import check_link_rate, output_dir, reproduce_command, make_console, progress_bar, machine_facts, markdown_table, update_results_section, write_json

BASELINES = ["noop", "dense", "fp16", "powersgd"]
DEEPREDUCE = [
    "topk:0.01/eliasfano/fp16",
    "topk:0.01/eliasfano/qsgd",
    "topk:0.01/bloom:policy=p0/qsgd",
    "mstopk:0.01/eliasfano/fp16",
    "topk:0.001/eliasfano/fp16",
    "auto",
]
LINKS = ["100mbit", "1gbit", "unshaped"]
# With several processes per node (--procs-per-node): the schemes side by side. A config
# "SPEC@SCHEME" runs the compressor SPEC with the engine's scheme SCHEME.
TOPOLOGY_CONFIGS = [
    "noop", "dense", "powersgd",
    "topk:0.01/eliasfano/fp16",
    "topk:0.01/eliasfano/fp16@hierarchical",
    "topk:0.01/eliasfano/fp16@shared_index",
    "topk:0.01/eliasfano/fp16@hierarchical_shared_index",
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


def model_label(rows: list[dict], short: bool = False) -> str:
    """What the rows' runs trained: ResNet-50's layout, or the small ``--quick`` one."""
    if any(r.get("quick") for r in rows):
        numel = sum(shape.numel() for shape in resnet_shapes(quick=True))
        return f"--quick layout ({numel / 1e6:.2f} M)" if short else (
            f"the --quick layout, 5 small tensors ({numel / 1e6:.2f} M parameters): a smoke test, not a measurement")
    return "ResNet-50 layout (25.6 M)" if short else "ResNet-50's 161 parameter tensors (25.6 M parameters)"


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
    plan = state.stats().get("plan") if hasattr(state, "engine") else None  # compressor "auto": what it chose
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "config": args.config, "step_s": step_s, "hook_in_flight_s": comm_s,
        "tx_bytes": tx, "params_digest": digest, "hook_stats": hook_stats, "plan": plan,
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
        "plan": next((r["plan"]["buckets"] for r in reports if r.get("plan")), None),  # "auto": bucket -> option
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
    if hook in BASELINES or hook == "auto":
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
        f"Model: {model_label(rows)}, DDP default 25 MB buckets, cheap "
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
              "vs powersgd", "vs dense"]
    table = [[f"{r['nodes']} x {r['procs_per_node']}", r["link"], r["config"], f"{r['step_time_s']:.3f}",
              f"{r['comm_time_s']:.3f}", _fmt_bytes(r["bytes_per_step"]),
              "-" if not r.get("speedup_vs_powersgd") else f"{r['speedup_vs_powersgd']:.2f}x", _fmt_speedup(r)]
             for r in rows]
    notes = [f"- `{config}` was not run: {why}." for config, why in skipped.items()]
    return "\n".join([
        f"## Bandwidth with {L} processes per node: hierarchical vs. flat",
        "",
        f"Reproduce: `{command}` (as root). Machine: {facts['cpu_cores']} cores shared by every process of every "
        f"node, torch {facts['torch']}. Each node is a network namespace with "
        f"{L} DDP processes talking over its loopback; only traffic between nodes crosses the `tc tbf`-shaped link.",
        "",
        ("Model, steps" if not any(r.get("quick") for r in rows) else f"Model: {model_label(rows)}. Steps")
        + " and `powersgd` as in the section above. Inter-node bytes: the node interface's transmit counter "
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
        ax.set_title(f"{nodes} nodes" + (f" x {per_node} processes" if per_node > 1 else "") + f", {model_label(rows, short=True)}")
        ax.grid(True, which="both", alpha=0.3)
    # One legend below the panels: inside them it covered the slow configurations' lines.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 4) // 5), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- cost model ---------------------------------------------------------------------------------

MODEL_SCHEMES = ("dense", "powersgd", "allgather", "hierarchical", "shared_index", "hierarchical_shared_index")


@dataclass(frozen=True)
class CostConstants:
    """Inputs of :func:`predict_step`, measured (``deepreduce bench bandwidth --cost-model``
    fits them from a topology run and records them in RESULTS.md).

    Rates are goodputs in bytes/s, each way; costs per element are for one core (or GPU)
    per rank; ``cores`` shares fewer cores among all ranks, as the emulation on one
    machine does (None: one each)."""

    link_Bps: float  # a node's link to the other nodes
    intra_Bps: float  # between two processes of a node
    latency_s: float  # one message: a step of a ring collective
    index_bytes: float  # index bytes per kept element (codec + framing)
    value_bytes: float  # value bytes per kept element
    select_s: float  # error feedback + top-k + encode, per element compressed
    decode_s: float  # decode + add, per kept element received
    powersgd_s: float  # PowerSGD's own compute per step (orthogonalisation, products), one rank
    powersgd_elements: int  # elements PowerSGD allreduces per step (P, Q, 1-D tensors)
    compute_s: float = 0.0  # forward + backward
    collectives: int = 1  # buckets per step: latency is paid per bucket
    cores: float | None = None


def predict_step(scheme: str, *, numel: int, ranks: int, node_size: int, density: float, c: CostConstants) -> dict:
    """Predicted seconds per step and inter-node bytes per rank of one gradient exchange.

    Ranks are numbered node by node (``node_size`` per node, N nodes). Flat collectives
    (dense, PowerSGD, all-gather, shared index) run as rings over all W ranks: each node
    has one ring edge to the next node, so every edge moves the ring's per-edge bytes and
    the slowest edge (the link between nodes, if N > 1) sets the pace. Formulas, with
    ``B`` the link rate, ``a`` the latency, ``k = density * numel``, ``p = bytes per kept``:

    - dense:        2 (W-1)/W * 4 numel / B + 2 (W-1) a                        (ring allreduce)
    - powersgd:     2 (W-1)/W * 4 m / B + 6 (W-1) a + PowerSGD compute          (m = P, Q, 1-D elements)
    - allgather:    (W-1) k p / B + 2 (W-1) a + select * numel + decode * (W-1) k
    - hierarchical: 2 (L-1)/L * 4 numel / B_intra + 2 (L-1) a                  (reduce-scatter + all-gather)
                    + L (N-1) (k/L) p / B + 2 (N-1) a                           (L rings share a node's link)
                    + select * numel/L + decode * (N-1) k/L
    - shared_index: k p_index / B + 2 (W-1)/W * k p_value / B + 3 (W-1) a       (one rank's indices to all,
                    + select * numel + decode * k                                then an allreduce of k values)
    - hierarchical_shared_index: the intra-node terms of hierarchical          (shared index among the N
                    + L (k/L) (p_index + 2 (N-1)/N p_value) / B + 3 (N-1) a      ranks of each local rank;
                    + select * numel/L + decode * k/L                            L rings share a node's link)

    Latency terms are per bucket (``c.collectives``); compute, and the bytes moved at
    ``B_intra`` (loopback copies are CPU work), are multiplied by ``W / c.cores`` when ranks
    share fewer cores. A compressed exchange that would move
    more than a dense allreduce falls back to it, as the engine does. Returns
    ``step_s`` (including ``c.compute_s``), ``wire_s``, ``intra_s``, ``codec_s`` and
    ``inter_node_bytes`` (per rank per step)."""
    if scheme not in MODEL_SCHEMES:
        raise ValueError(f"scheme must be one of {MODEL_SCHEMES}, got {scheme!r}")
    if ranks < 1 or node_size < 1 or ranks % node_size:
        raise ValueError(f"ranks ({ranks}) must be a positive multiple of node_size ({node_size})")
    W, L = ranks, node_size
    N = W // L
    slowest = c.link_Bps if N > 1 else c.intra_Bps
    crowd = max(1.0, W / c.cores) if c.cores else 1.0
    per_kept = c.index_bytes + c.value_bytes
    lat = c.latency_s * c.collectives

    def ring_allreduce(nbytes: float, world: int, rate: float, messages: int = 2) -> tuple[float, float]:
        edge = 2 * (world - 1) / world * nbytes
        copies = crowd if N == 1 else 1.0  # one node: the ring runs over loopback, moved by the ranks' own cores
        return edge, edge / rate * copies + messages * (world - 1) * lat

    intra_s = codec_s = 0.0
    if scheme == "dense":
        edge, wire_s = ring_allreduce(4 * numel, W, slowest)
    elif scheme == "powersgd":
        edge, wire_s = ring_allreduce(4 * c.powersgd_elements, W, slowest, messages=6)
        codec_s = c.powersgd_s * crowd
    elif scheme == "allgather":
        k = density * numel
        if W * k * per_kept > 2 * 4 * numel:  # the dense fallback
            edge, wire_s = ring_allreduce(4 * numel, W, slowest)
            codec_s = c.select_s * numel * crowd
        else:
            edge = (W - 1) * k * per_kept
            wire_s = edge / slowest + 2 * (W - 1) * lat
            codec_s = (c.select_s * numel + c.decode_s * (W - 1) * k) * crowd
    elif scheme == "shared_index":
        k = density * numel
        edge = k * c.index_bytes + 2 * (W - 1) / W * k * c.value_bytes
        wire_s = edge / slowest + 3 * (W - 1) * lat
        codec_s = (c.select_s * numel + c.decode_s * k) * crowd
    else:  # hierarchical, hierarchical_shared_index
        slot = numel / L
        k = density * slot
        if L > 1:
            intra_s = 2 * (L - 1) / L * 4 * numel / c.intra_Bps * crowd + 2 * (L - 1) * lat
        if N == 1:
            edge = wire_s = 0.0
            codec_s = c.select_s * slot * crowd
        elif scheme == "hierarchical_shared_index":
            edge = L * (k * c.index_bytes + 2 * (N - 1) / N * k * c.value_bytes)
            wire_s = edge / c.link_Bps + 3 * (N - 1) * lat
            codec_s = (c.select_s * slot + c.decode_s * k) * crowd
        elif N * k * per_kept > 2 * 4 * slot:
            per_rank, wire_s = ring_allreduce(4 * slot, N, c.link_Bps / L)
            edge = L * per_rank
            codec_s = c.select_s * slot * crowd
        else:
            edge = L * (N - 1) * k * per_kept  # the node's L rings share its link
            wire_s = edge / c.link_Bps + 2 * (N - 1) * lat
            codec_s = (c.select_s * slot + c.decode_s * (N - 1) * k) * crowd
    inter = edge / L if N > 1 else 0.0
    return {"step_s": c.compute_s + wire_s + intra_s + codec_s, "wire_s": wire_s, "intra_s": intra_s,
            "codec_s": codec_s, "inter_node_bytes": inter}


def powersgd_elements(shapes: list[torch.Size], rank: int = 4, min_compression_rate: float = 2.0) -> int:
    """Elements torch's powerSGD_hook allreduces per step for parameters of ``shapes``: P and Q
    of every matrix worth compressing, the others (and 1-D tensors) whole."""
    total = 0
    for shape in shapes:
        numel = int(torch.Size(shape).numel())
        if len(shape) <= 1:
            total += numel
            continue
        n, m = shape[0], numel // shape[0]
        total += (n + m) * rank if n * m > (n + m) * rank * min_compression_rate else numel
    return total


_PROBE = """
import os, sys, time, json, torch, torch.distributed as dist
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
small, big = torch.zeros(1), torch.zeros(int(sys.argv[4]) // 4)
for _ in range(20): dist.all_reduce(small)
times = []
for _ in range(200):
    began = time.perf_counter(); dist.all_reduce(small); times.append(time.perf_counter() - began)
small_s = sorted(times)[len(times) // 2]  # the median: a busy machine's scheduling hiccups left out
dist.all_reduce(big); dist.barrier(); began = time.perf_counter()
for _ in range(3): dist.all_reduce(big)
big_s = (time.perf_counter() - began) / 3
if rank == 0: open(out, "w").write(json.dumps({"small_s": small_s, "big_s": big_s}))
dist.barrier(); dist.destroy_process_group()
"""


def measure_loopback(nbytes: int = 1 << 26) -> tuple[float, float]:
    """(latency_s, bytes/s) between two gloo processes of one node (loopback): a 1-element
    allreduce is two ring steps; a ``nbytes`` one moves ``nbytes`` each way."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "probe.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE, str(r), str(port), str(result), str(nbytes)], env=env)
                 for r in range(2)]
        for proc in procs:
            proc.wait(timeout=300)
        probe = json.loads(result.read_text())
    return probe["small_s"] / 2, nbytes / probe["big_s"]


def fit_constants(rows: list[dict], cores: float, latency_s: float, probe_Bps: float, *, fit_nodes: int = 2) -> dict:
    """CostConstants' fields from a topology run's rows (see :func:`write_cost_model`).

    From every row: the link goodput per link rate (dense runs), the per-element codec
    costs and bytes per kept element (the flat all-gather runs' hook counters, their
    compute shared ``W / cores`` ways). From the ``fit_nodes``-node rows only, so that the
    other rows check the model out of sample: PowerSGD's compute (what the PowerSGD step
    takes beyond the modelled wire, per ``W / cores`` share) and the rate between the
    processes of a node (what the hierarchical step takes beyond the rest of its model:
    gloo's loopback copies are CPU work, shared as compute is). ``probe_Bps`` (a 2-process
    loopback allreduce on an idle machine) is recorded, and stands in for the node's rate
    when no hierarchical row was run (PowerSGD's compute is then 0)."""
    from .. import netns

    shapes = resnet_shapes(False)
    numel = sum(int(torch.Size(s).numel()) for s in shapes)

    def noop_of(row: dict) -> float:
        return next(r["step_time_s"] for r in rows if r["config"] == "noop" and r["nodes"] == row["nodes"]
                    and r["link"] == row["link"])

    efficiency: dict[str, list[float]] = {}
    for row in rows:
        if row["config"] != "dense":
            continue
        W = row["nodes"] * row["procs_per_node"]
        edge = 2 * (W - 1) / W * 4 * numel
        efficiency.setdefault(row["link"], []).append(edge / (row["step_time_s"] - noop_of(row)) / (netns.parse_rate(row["link"]) / 8))
    flat = [r for r in rows if r["config"] == "topk:0.01/eliasfano/fp16" and r.get("hook_stats")]
    select, decode, per_kept, buckets = [], [], [], []
    for row in flat:
        stats, W = row["hook_stats"], row["nodes"] * row["procs_per_node"]
        crowd = max(1.0, W / cores)
        select.append(stats["compress_s"] / stats["numel"] / crowd)
        decode.append(stats["decompress_s"] / (stats["kept"] * (W - 1)) / crowd)
        per_kept.append(stats["payload_bytes"] / stats["kept"])
        buckets.append(stats["compressed_buckets"] / stats["steps"])
    fit = {
        "link_efficiency": {link: statistics.median(v) for link, v in efficiency.items()},
        "intra_Bps": math.inf, "probe_Bps": probe_Bps, "latency_s": latency_s,
        "index_bytes": statistics.median(per_kept) - 2.0, "value_bytes": 2.0,  # fp16 values
        "select_s": statistics.median(select), "decode_s": statistics.median(decode),
        "powersgd_s": 0.0, "powersgd_elements": powersgd_elements(shapes), "numel": numel,
        "collectives": round(statistics.median(buckets)), "cores": cores, "fit_nodes": fit_nodes,
    }

    def unexplained(row: dict, scheme: str) -> tuple[float, float]:
        """(seconds the model leaves unexplained with the constant being fitted at zero cost, crowd)."""
        W, L = row["nodes"] * row["procs_per_node"], row["procs_per_node"]
        c = constants_for(fit, row["link"], cores=cores, compute_s=noop_of(row))
        got = predict_step(scheme, numel=numel, ranks=W, node_size=L, density=0.01, c=c)
        return row["step_time_s"] - got["step_s"], max(1.0, W / cores)

    psgd = [unexplained(r, "powersgd") for r in rows if r["config"] == "powersgd" and r["nodes"] == fit_nodes]
    if psgd:
        fit["powersgd_s"] = statistics.median(max(0.0, left) / crowd for left, crowd in psgd)
    intra = []
    for row in rows:
        if MODEL_CONFIGS.get(row["config"]) != "hierarchical" or row["nodes"] != fit_nodes or row["procs_per_node"] < 2:
            continue
        left, crowd = unexplained(row, "hierarchical")
        L = row["procs_per_node"]
        if left > 0:
            intra.append(2 * (L - 1) / L * 4 * numel * crowd / left)
    fit["intra_Bps"] = statistics.median(intra) if intra else probe_Bps
    return fit


MODEL_CONFIGS = {"dense": "dense", "powersgd": "powersgd", "topk:0.01/eliasfano/fp16": "allgather",
                 "topk:0.01/eliasfano/fp16@hierarchical": "hierarchical",
                 "topk:0.01/eliasfano/fp16@shared_index": "shared_index",
                 "topk:0.01/eliasfano/fp16@hierarchical_shared_index": "hierarchical_shared_index"}


def constants_for(fit: dict, link: str, *, cores: float | None, compute_s: float = 0.0) -> CostConstants:
    from .. import netns

    return CostConstants(
        link_Bps=fit["link_efficiency"][link] * netns.parse_rate(link) / 8, intra_Bps=fit["intra_Bps"],
        latency_s=fit["latency_s"], index_bytes=fit["index_bytes"], value_bytes=fit["value_bytes"],
        select_s=fit["select_s"], decode_s=fit["decode_s"], powersgd_s=fit["powersgd_s"],
        powersgd_elements=fit["powersgd_elements"], compute_s=compute_s, collectives=fit["collectives"], cores=cores)


def write_cost_model(out: Path, argv: list[str]) -> int:
    """The cost-model section of RESULTS.md, from the stored topology results: constants
    fitted from them (plus a loopback probe), the model checked against every measured
    point, and predictions at 8, 64 and 256 ranks (8 per node)."""
    stored = out / "results" / "bandwidth_topology.json"
    if not stored.exists():
        print(f"no topology results at {stored}: run deepreduce bench bandwidth --procs-per-node 2 first", file=sys.stderr)
        return 2
    rows = json.loads(stored.read_text())
    fit_nodes = min(r["nodes"] for r in rows)
    needed = {"noop", "dense", "powersgd", "topk:0.01/eliasfano/fp16", "topk:0.01/eliasfano/fp16@hierarchical"}
    missing = needed - {r["config"] for r in rows if r["nodes"] == fit_nodes}
    if missing:
        print(f"cost model: not written; its constants come from the {', '.join(sorted(needed))} runs on "
              f"{fit_nodes} nodes, and {stored} has no {', '.join(sorted(missing))}", file=sys.stderr)
        return 0
    cores = float(rows[0]["machine"]["cpu_cores"])
    latency_s, probe_Bps = measure_loopback()
    fit = fit_constants(rows, cores, latency_s, probe_Bps, fit_nodes=fit_nodes)
    numel = fit["numel"]
    check = []
    for row in rows:
        scheme = MODEL_CONFIGS.get(row["config"])
        if scheme is None or row["link"] not in fit["link_efficiency"]:
            continue
        noop = next(r["step_time_s"] for r in rows if r["config"] == "noop" and r["nodes"] == row["nodes"]
                    and r["link"] == row["link"])
        c = constants_for(fit, row["link"], cores=cores, compute_s=noop)
        got = predict_step(scheme, numel=numel, ranks=row["nodes"] * row["procs_per_node"],
                           node_size=row["procs_per_node"], density=0.01, c=c)
        fitted = row["nodes"] == fit_nodes and scheme in ("powersgd", "hierarchical")
        check.append([f"{row['nodes']} x {row['procs_per_node']}", row["link"], scheme + (" (fitted)" if fitted else ""),
                      f"{row['step_time_s']:.3f}",
                      f"{got['step_s']:.3f}", f"{got['step_s'] / row['step_time_s']:.2f}",
                      _fmt_bytes(row["bytes_per_step"]), _fmt_bytes(got["inter_node_bytes"])])
    predictions = []
    for link in sorted(fit["link_efficiency"], key=lambda lk: -len(lk)):
        c = constants_for(fit, link, cores=None)
        for scheme in MODEL_SCHEMES:
            cells = []
            for ranks in (8, 64, 256):
                got = predict_step(scheme, numel=numel, ranks=ranks, node_size=8, density=0.01, c=c)
                cells.append(f"{got['step_s']:.3f} s, {got['inter_node_bytes'] / 1e6:.2f} MB")
            predictions.append([link, scheme, *cells])
    command = reproduce_command("bandwidth", argv)
    body = "\n".join([
        "## Cost model: which scheme wins where",
        "",
        f"Reproduce: `{command}` (reads `results/bandwidth_topology.json`; the function is "
        "`deepreduce.apps.bench.bandwidth.predict_step`, its formulas in its docstring). Per step, for a "
        "model of `numel` fp32 parameters, W ranks in N nodes of L, density 1 %:",
        "",
        "- dense ring allreduce: `2 (W-1)/W * 4 numel / B + 2 (W-1) a`",
        "- PowerSGD: `2 (W-1)/W * 4 m / B + 6 (W-1) a + t_psgd` (m: P, Q and 1-D elements)",
        "- flat all-gather top-k: `(W-1) k p / B + 2 (W-1) a + s numel + r (W-1) k`",
        "- hierarchical: `2 (L-1)/L * 4 numel / B_node + 2 (L-1) a + L (N-1) (k/L) p / B + 2 (N-1) a + s numel/L + r (N-1) k/L`",
        "- shared index (one rank's top-k indices to all, values allreduced): "
        "`k p_idx / B + 2 (W-1)/W * k p_val / B + 3 (W-1) a + s numel + r k`",
        "",
        "with `k = 0.01 numel`, latency terms per DDP bucket, compute terms and the bytes moved at `B_node` "
        "(loopback copies are CPU work) times `W / cores` when ranks share cores (the emulation), and the engine's "
        "dense fallback when an exchange would exceed an allreduce.",
        "",
        "Constants (fitted from the run above, its hook counters, and a loopback probe of two gloo processes):",
        "",
        markdown_table(["constant", "value", "from"], [
            ["B, 100 Mbit/s link", f"{fit['link_efficiency'].get('100mbit', float('nan')) * 12.5:.2f} MB/s", "dense runs: ring bytes / (step - noop)"],
            ["B, 1 Gbit/s link", f"{fit['link_efficiency'].get('1gbit', float('nan')) * 125:.1f} MB/s", "dense runs"],
            ["B_node (inside a node)", f"{fit['intra_Bps'] / 1e6:.0f} MB/s per core",
             f"{fit_nodes}-node hierarchical runs: intra-node bytes x (W / cores) / what the rest of the model leaves "
             f"(an idle 2-process loopback allreduce of 64 MiB: {fit['probe_Bps'] / 1e6:.0f} MB/s)"],
            ["a, per message", f"{fit['latency_s'] * 1e6:.0f} us", "2-process gloo allreduce of 1 element (median) / 2"],
            ["p, bytes per kept element", f"{fit['index_bytes'] + fit['value_bytes']:.2f} (index {fit['index_bytes']:.2f} + fp16 2)",
             "hook counters: payload bytes / kept (eliasfano + fp16 + framing)"],
            ["s, select + encode", f"{fit['select_s'] * 1e9:.1f} ns per element", "hook counters: compress time / elements, / (W / cores)"],
            ["r, decode + add", f"{fit['decode_s'] * 1e9:.1f} ns per kept element", "hook counters: decompress time / received kept"],
            ["t_psgd", f"{fit['powersgd_s']:.3f} s", f"{fit_nodes}-node PowerSGD runs: what the wire and noop terms "
             "leave, / (W / cores) (a world-size-1 run on an idle machine: 0.143 s, ALGORITHMS.md section 10)"],
            ["m (PowerSGD rank 4)", f"{fit['powersgd_elements'] / 1e6:.3f} M elements", "the layout's matrices"],
            ["buckets per step", str(fit["collectives"]), "hook counters"],
        ]),
        "",
        "Checked against the measured points (the model plus the measured `noop` step; compute and loopback "
        f"copies shared by {cores:.0f} cores). The rows marked fitted set `t_psgd` and `B_node`; every other row "
        f"is a check, the {fit_nodes}-node constants predicting the larger topologies out of sample:",
        "",
        markdown_table(["nodes x procs", "link", "scheme", "measured s", "model s", "model / measured",
                        "measured inter-node bytes/rank", "model"], check),
        "",
        "Predictions at 8, 64 and 256 ranks, 8 per node (1, 8 and 32 nodes): the links of this emulation "
        "(inside a node: the loopback rate above), one core per rank with the per-element costs above (CPU "
        "costs of this machine's cores; on GPUs `s`, `r` and `t_psgd` shrink by orders of magnitude and "
        "the wire terms dominate), no forward/backward time (the step time the exchange adds; inter-node MB "
        "per rank per step). A compressed exchange past the dense-fallback point is priced as the allreduce "
        "it falls back to (flat all-gather at 256 ranks).",
        "",
        markdown_table(["link", "scheme", "8 ranks", "64 ranks", "256 ranks"], predictions),
    ])
    update_results_section(out / "RESULTS.md", "cost-model", body)
    write_json(out / "results" / "cost_model.json", {"constants": fit, "check": check, "predictions": predictions})
    print(body)
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
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.nodes is not None and min(args.nodes) < 1:
        parser.error(f"--nodes must be >= 1, got {min(args.nodes)}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    for link in args.links or []:
        check_link_rate(parser, "--links", link, "unshaped")
    topology = args.procs_per_node > 1
    out = output_dir(args.out, args.quick)
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
    if skipped and all(c in skipped or c == "noop" for c in configs):
        parser.error("no configuration left to run: " + "; ".join(f"{c}: {why}" for c, why in skipped.items()))
    for config, why in skipped.items():
        console.print(f"[yellow]skipping {config}: {why}")
    configs = [c for c in configs if c not in skipped]
    if "noop" not in configs:
        configs = ["noop"] + configs  # the compute-only reference for comm time
    scratch = Path(tempfile.mkdtemp(prefix="deepreduce-bandwidth-runs-"))
    console.print(f"run logs and the rows measured so far: {scratch}")
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
                        steps = args.steps if args.steps is not None else (2 if args.quick else 3 if link == "100mbit" else 5)
                        port += 1
                        row = run_config(cluster, config, steps, scratch, port, threads, args.quick, args.timeout)
                        rows.append(dict(row, quick=args.quick))
                        write_json(scratch / "rows.json", rows)  # kept if a later run fails
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

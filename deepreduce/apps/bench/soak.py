"""Soak: long training runs over emulated links that flap, change rate and lose packets.

For each recommended configuration, N emulated nodes (network namespaces on a private
bridge, ``tc tbf`` at both ends of every link, :class:`deepreduce.apps.netns.NetnsCluster`)
each run one rank of ``deepreduce train`` for many steps while a chaos thread, once the
run is past its dense warm-up steps, keeps injecting faults:

- **flaps**: a node's link goes down for a few seconds (its own interface, its bridge
  port, or both), then up again: shorter than the collective timeout (``--timeout``),
  so the run must ride it out;
- **rate changes**: every link's ``tbf`` is replaced while traffic flows, cycling
  20 Mbit/s -> 1 Gbit/s -> back to the starting rate;
- **packet loss**: a node's link drops 1 % or 5 % of its frames each way for a few
  seconds (nftables ``numgen random`` on the ingress of both ends of its veth pair; this
  kernel has no ``netem``), where ``nft`` works.

A run passes if every rank exits 0, no run hangs (no step for ``--stall`` seconds, or the
whole run past ``--deadline``, is a hang: it is stopped and reported), and the final
parameters (``--checkpoint``: ``rank<r>.pt``, key ``model``) are bitwise identical on every
rank. Each configuration is also trained once more on the same cluster without faults
(``--no-reference`` skips it): training is deterministic, so the faulted run must end
with exactly the reference's parameters, i.e. the faults lost nothing.

Reported per configuration: steps, wall time, median / p95 / max step time (rank 0),
bytes per step (handed to collectives by rank 0; and on the wire, the node interfaces'
transmit counters, TCP retransmissions included), the events injected, the exit codes,
and whether parameters agree.

    deepreduce bench soak                         # 4 nodes, 100 Mbit/s, 2000 steps x 3 configurations
    deepreduce bench soak --specs update --steps 500
    deepreduce bench soak --quick                 # smoke: 2 nodes, ~30 steps, one flap, one rate change

Needs root (network namespaces), iproute2, and for packet loss nftables.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..metrics import read_metrics
from . import check_link_rate, output_dir, machine_facts, make_console, markdown_table, reproduce_command, update_results_section, write_json

# The README's recommended configurations, and dense as the reference. The update mode's
# AdamW learning rate is doubled, as the README advises (each rank's Adam normalises its
# own noisier gradient, and the averaged update is shorter).
LR, WEIGHT_DECAY = 4.2e-3, 0.01
SPECS: dict[str, list[str]] = {
    "update": ["--mode", "update", "--compression", "topk:0.035/eliasfano/uniform:bits=1", "--keep-unsent",
               "--local-steps", "1", "--optimizer", "adamw", "--lr", f"{2 * LR:g}", "--weight-decay", f"{WEIGHT_DECAY:g}"],
    "hook": ["--compression", "topk:0.01/eliasfano/fp16", "--density-warmup", "300", "--optimizer", "adamw",
             "--lr", f"{LR:g}", "--weight-decay", f"{WEIGHT_DECAY:g}"],
    "dense": ["--compression", "dense", "--optimizer", "adamw", "--lr", f"{LR:g}", "--weight-decay", f"{WEIGHT_DECAY:g}"],
}
# A small LM (137 k parameters, several DDP buckets): a few tenths of a second per step on
# a shared 2-core machine, ~0.55 MB dense per step, so 100 Mbit/s and 20 Mbit/s show.
MODEL = ["--d-model", "64", "--layers", "2", "--heads", "2", "--seq-len", "64", "--batch", "8", "--corpus-mb", "2",
         "--bucket-mb", "0.25", "--min-numel", "256", "--start-iter", "10", "--eval-every", "500", "--eval-batches", "4"]
QUICK_MODEL = ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4", "--corpus-mb", "1",
               "--bucket-mb", "0.03", "--min-numel", "256", "--start-iter", "3", "--eval-every", "0"]
COMMON = ["--threads", "1", "--log-every", "0", "--quiet", "--seed", "0"]
RATES = ("20mbit", "1gbit")  # then back to the run's own rate
LOSSES = (0.01, 0.05)
FLAP_ENDS = ("node", "bridge", "both")


# --- faults ------------------------------------------------------------------------------------


@dataclass
class ChaosPlan:
    """When and how hard the chaos thread strikes.

    Events start once the run has made ``start_step`` steps (past the dense warm-up, so
    compressed exchanges are hit too) and follow each other ``gap_s`` apart (uniform in
    the range); ``kinds`` cycle. A flap keeps the link down ``flap_s``; a loss event lasts
    ``loss_s``. ``max_events`` caps the total (None: until the run ends)."""

    start_step: int = 20
    gap_s: tuple[float, float] = (3.0, 8.0)
    flap_s: tuple[float, float] = (2.0, 8.0)
    loss_s: tuple[float, float] = (4.0, 10.0)
    kinds: tuple[str, ...] = ("flap", "rate", "loss")
    max_events: int | None = None
    step_gaps: tuple[int, ...] = ()  # steps to wait between events (quick runs: events land inside short runs)


def quick_plan(loss: bool) -> ChaosPlan:
    kinds = ("flap", "rate", "loss") if loss else ("flap", "rate")
    return ChaosPlan(start_step=5, gap_s=(0.0, 0.0), flap_s=(1.5, 1.5), loss_s=(1.0, 1.0), kinds=kinds,
                     max_events=len(kinds), step_gaps=(3,))


class Chaos(threading.Thread):
    """Injects :class:`ChaosPlan`'s faults into ``cluster`` while ``step()`` (the run's
    progress) advances; :meth:`finish` stops it and restores every link (up, no loss,
    ``base_rate``). ``events`` records what was done, when, and for how long."""

    def __init__(self, cluster, plan: ChaosPlan, step: Callable[[], int], base_rate: str | None, seed: int,
                 loss: bool) -> None:
        super().__init__(daemon=True, name="chaos")
        self.cluster, self.plan, self.step, self.base_rate = cluster, plan, step, base_rate
        self.rng = random.Random(seed)
        self.loss = loss
        self.kinds = [k for k in plan.kinds if k != "loss" or loss]
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()  # (Thread has a _stop of its own)
        self._finished = False
        self._t0 = time.monotonic()

    def finish(self) -> None:
        """Stop injecting (a flap or loss event in progress ends first) and restore every link."""
        if self._finished:
            return
        self._finished = True
        self._halt.set()
        if self.is_alive():
            self.join()
        self._restore()

    def _restore(self) -> None:
        for node in range(self.cluster.nodes):
            for action in (lambda: self.cluster.set_link(node, True, "both"),
                           lambda: self.cluster.set_loss(node, 0) if self.loss else None,
                           lambda: self.cluster.set_rate(node, self.base_rate)
                           if self.cluster.rates[node] != self.base_rate else None):
                try:
                    action()
                except Exception as error:  # keep restoring the rest; the error is reported
                    self.errors.append(f"restore node {node}: {error}")

    def _wait_for_step(self, target: int) -> bool:
        while self.step() < target:
            if self._halt.wait(0.05):
                return False
        return True

    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 2)

    def run(self) -> None:
        try:
            self._run()
        except Exception as error:  # a failed tc/ip/nft command: report it, the run goes on
            self.errors.append(f"{type(error).__name__}: {error}")

    def _run(self) -> None:
        if not self._wait_for_step(self.plan.start_step):
            return
        rates = [*RATES, self.base_rate]
        count = 0
        while not self._halt.is_set() and (self.plan.max_events is None or count < self.plan.max_events):
            kind = self.kinds[count % len(self.kinds)]
            if count and self.plan.step_gaps and not self._wait_for_step(self.step() + self.plan.step_gaps[0]):
                return
            if self._halt.wait(self.rng.uniform(*self.plan.gap_s) if count else 0.0):
                return
            event: dict[str, Any] = {"kind": kind, "t_s": self._now(), "step": self.step()}
            if kind == "flap":
                node = self.rng.randrange(self.cluster.nodes)
                end = FLAP_ENDS[sum(e["kind"] == "flap" for e in self.events) % len(FLAP_ENDS)]
                planned = self.rng.uniform(*self.plan.flap_s)
                event.update(node=node, end=end)
                began = time.monotonic()
                self.cluster.set_link(node, False, end)
                try:
                    # the run ended meanwhile: the link comes back early, and the event says so
                    event["cut_short"] = self._halt.wait(planned)
                finally:
                    self.cluster.set_link(node, True, end)
                event["duration_s"] = round(time.monotonic() - began, 2)
            elif kind == "rate":
                rate = rates[sum(e["kind"] == "rate" for e in self.events) % len(rates)]
                for node in range(self.cluster.nodes):
                    self.cluster.set_rate(node, rate)
                event.update(rate=rate or "unshaped", nodes="all")
            else:
                node = self.rng.randrange(self.cluster.nodes)
                probability = LOSSES[sum(e["kind"] == "loss" for e in self.events) % len(LOSSES)]
                planned = self.rng.uniform(*self.plan.loss_s)
                event.update(node=node, probability=probability)
                began = time.monotonic()
                self.cluster.set_loss(node, probability)
                try:
                    event["cut_short"] = self._halt.wait(planned)
                finally:
                    event["dropped_packets"] = self.cluster.lost_packets(node)
                    self.cluster.set_loss(node, 0)
                event["duration_s"] = round(time.monotonic() - began, 2)
            self.events.append(event)
            count += 1


# --- one run -------------------------------------------------------------------------------------


class MetricsTail:
    """Counts the step records that rank 0 has written to a ``--metrics`` file so far."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._partial, self.steps = path, 0, b"", 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.steps
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self.steps += sum(1 for line in lines if line.startswith(b'{"step"'))
        return self.steps


def model_digest(path: Path) -> str | None:
    """SHA-256 of a checkpoint's ``model`` tensors (names, dtypes, shapes, bytes); None if
    the file is missing or unreadable."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    except Exception:
        return None
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _netns_counter(cluster, node: int, path: str) -> str:
    # `ip netns exec` remounts /sys for the namespace; /proc/net follows the reader's namespace.
    return subprocess.run(cluster.argv(node, ["cat", path]), capture_output=True, text=True).stdout


def link_counters(cluster, node: int) -> dict[str, int]:
    """The node's interface transmit bytes and its TCP retransmitted segments so far."""
    tx = _netns_counter(cluster, node, f"/sys/class/net/{cluster.ifname}/statistics/tx_bytes").strip()
    snmp = [line.split() for line in _netns_counter(cluster, node, "/proc/net/snmp").splitlines() if line.startswith("Tcp:")]
    retrans = int(snmp[1][snmp[0].index("RetransSegs")]) if len(snmp) == 2 and "RetransSegs" in snmp[0] else -1
    return {"tx_bytes": int(tx) if tx.isdigit() else -1, "tcp_retrans_segs": retrans}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class RunSettings:
    nodes: int
    rate: str | None
    steps: int
    timeout_s: float  # deepreduce train --timeout: how long a collective waits
    deadline_s: float  # the whole run
    stall_s: float  # no new step for this long: a hang
    quick: bool = False
    loss: bool = True
    seed: int = 0
    extra: list[str] = field(default_factory=list)


def run_once(name: str, spec_args: list[str], settings: RunSettings, scratch: Path, port: int,
             chaos_plan: ChaosPlan | None, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One training run on a fresh cluster, with faults if ``chaos_plan`` is given."""
    from ..netns import NetnsCluster

    label = f"{name}-{'chaos' if chaos_plan else 'reference'}"
    run_dir = scratch / label
    checkpoint, metrics = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in [metrics, *checkpoint.glob("rank*")]:
        stale.unlink(missing_ok=True)
    model = QUICK_MODEL if settings.quick else MODEL
    train_args = [*model, *COMMON, *spec_args, *settings.extra, "--steps", str(settings.steps),
                  "--timeout", f"{settings.timeout_s:g}", "--checkpoint", str(checkpoint), "--metrics", str(metrics)]
    tail = MetricsTail(metrics)
    hang = None
    chaos = None
    with NetnsCluster(settings.nodes, rate=settings.rate, name=f"drsk{os.getpid() % 10000}") as cluster:
        logs = [open(run_dir / f"node{node}.log", "w") for node in range(settings.nodes)]
        started = time.monotonic()
        try:
            procs = [cluster.popen(node, cluster.torchrun_argv(node, ["-m", "deepreduce", "train", *train_args], port=port),
                                   port=port, env={"OMP_NUM_THREADS": "1"}, stdout=logs[node], stderr=subprocess.STDOUT)
                     for node in range(settings.nodes)]
            if chaos_plan is not None:
                chaos = Chaos(cluster, chaos_plan, lambda: tail.steps, settings.rate, settings.seed, settings.loss)
                chaos.start()
            last_step, last_progress, failed_at = 0, time.monotonic(), None
            while True:
                now = time.monotonic()
                steps = tail.poll()
                if steps != last_step:
                    last_step, last_progress = steps, now
                    if on_step:
                        on_step(steps)
                codes = [p.poll() for p in procs]
                if all(code is not None for code in codes):
                    break
                if failed_at is None and any(code not in (None, 0) for code in codes):
                    failed_at = now  # the others leave within --timeout on their own: give them that
                if failed_at is not None and now - failed_at > settings.timeout_s + 30:
                    break
                if now - last_progress > settings.stall_s:
                    hang = f"no step for {settings.stall_s:.0f} s after step {last_step}"
                    break
                if now - started > settings.deadline_s:
                    hang = f"past the {settings.deadline_s:.0f} s deadline at step {last_step}"
                    break
                time.sleep(0.1)
            wall_s = time.monotonic() - started
            if chaos is not None:
                chaos.finish()
            codes = [p.poll() for p in procs]
            cluster.terminate(procs)
            codes = [124 if code is None else code for code in codes]  # 124: stopped, as by timeout(1)
            counters = [link_counters(cluster, node) for node in range(settings.nodes)]
        finally:
            if chaos is not None:
                chaos.finish()
            for log in logs:
                log.close()
    records, summary = read_metrics(metrics)
    digests = [model_digest(checkpoint / f"rank{r}.pt") for r in range(settings.nodes)]
    step_s = [r["step_s"] for r in records]
    sent = [r["bytes_sent"] for r in records]
    steps_done = len(records)
    result: dict[str, Any] = {
        "config": name, "faults": chaos_plan is not None, "nodes": settings.nodes, "rate": settings.rate or "unshaped",
        "train_args": train_args, "steps_planned": settings.steps, "steps": steps_done, "exit_codes": codes,
        "hang": hang, "wall_s": round(wall_s, 1), "train_s": round(sum(step_s), 1),
        "median_step_s": statistics.median(step_s) if step_s else None,
        "p95_step_s": percentile(step_s, 0.95) if step_s else None,
        "max_step_s": max(step_s) if step_s else None,
        "bytes_per_step": statistics.fmean(sent) if sent else None,
        "median_bytes_per_step": statistics.median(sent) if sent else None,
        "dense_bytes_per_step": summary["dense_bytes_per_step"] if summary else None,
        "wire_bytes_per_step_per_rank": (statistics.fmean(c["tx_bytes"] for c in counters) / steps_done
                                         if steps_done else None),
        "tcp_retrans_segs": [c["tcp_retrans_segs"] for c in counters],
        "val_loss": summary.get("val_loss") if summary else None,
        "digests": digests,
        "bitwise_identical": None not in digests and len(set(digests)) == 1,
        "events": chaos.events if chaos else [],
        "chaos_errors": chaos.errors if chaos else [],
        "logs": str(run_dir),
    }
    result["ok"] = (not hang and codes == [0] * settings.nodes and steps_done == settings.steps
                    and result["bitwise_identical"] and not result["chaos_errors"])
    if not result["ok"]:
        result["log_tail"] = (run_dir / "node0.log").read_text()[-3000:]
    return result


def event_summary(events: list[dict]) -> dict[str, Any]:
    """Counts and durations of the injected events, by kind (the shortest and longest flap
    among those the run's end did not cut short)."""
    flaps = [e for e in events if e["kind"] == "flap"]
    whole = [e["duration_s"] for e in flaps if not e.get("cut_short")] or [e["duration_s"] for e in flaps]
    losses = [e for e in events if e["kind"] == "loss"]
    rates = [e for e in events if e["kind"] == "rate"]
    return {
        "flaps": len(flaps),
        "flaps_cut_short": sum(bool(e.get("cut_short")) for e in flaps),
        "flap_s": [min(whole), max(whole)] if flaps else None,
        "flap_down_s": round(sum(e["duration_s"] for e in flaps), 1),
        "flap_ends": {end: sum(e["end"] == end for e in flaps) for end in FLAP_ENDS},
        "rate_changes": len(rates),
        "rates": [e["rate"] for e in rates],
        "loss_events": len(losses),
        "loss_s": round(sum(e["duration_s"] for e in losses), 1),
        "dropped_packets": sum(e.get("dropped_packets", 0) for e in losses),
    }


# --- report -------------------------------------------------------------------------------------


def passed(row: dict) -> bool:
    """A faulted run passed: every rank exited 0 after all its steps, no hang, parameters
    bitwise identical across ranks, and (when there is one) its fault-free reference run
    passed too and ended with the very same parameters."""
    ref = row.get("reference")
    return bool(row["ok"] and (ref is None or (ref["ok"] and ref["digests"] == row["digests"])))


def _fmt(value: float | None, pattern: str, unit: str = "") -> str:
    return "-" if value is None else format(value, pattern) + unit


def _span(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:g}" if bounds[0] == bounds[1] else f"{bounds[0]:g}-{bounds[1]:g}"


def _spacing(plan: ChaosPlan) -> str:
    if plan.step_gaps:
        return f"{plan.max_events} events {plan.step_gaps[0]} steps apart"
    return f"one event every {_span(plan.gap_s)} s"


def render(rows: list[dict], facts: dict, command: str, loss_note: str, settings: RunSettings, plan: ChaosPlan) -> str:
    header = ["config", "steps", "events: flaps (down s, min-max) / rate changes / loss (s, dropped)", "exit codes",
              "hang", "wall s", "step s median / p95 / max", "bytes/step (collectives)", "wire bytes/step/rank",
              "TCP retrans", "ranks bitwise identical", "= fault-free run"]
    table = []
    for row in rows:
        ev = row["event_summary"]
        flap = (f"{ev['flaps']} ({ev['flap_down_s']:.0f} s, {ev['flap_s'][0]:.1f}-{ev['flap_s'][1]:.1f})"
                if ev["flaps"] else "0")
        loss = f"{ev['loss_events']} ({ev['loss_s']:.0f} s, {ev['dropped_packets']})" if ev["loss_events"] else "0"
        ref = row.get("reference")
        same = "-" if ref is None else ("yes" if ref["digests"][0] == row["digests"][0] and ref["bitwise_identical"] else "**no**")
        table.append([
            row["config"], f"{row['steps']}/{row['steps_planned']}", f"{flap} / {ev['rate_changes']} / {loss}",
            " ".join(map(str, row["exit_codes"])), row["hang"] or "none", f"{row['wall_s']:.0f}",
            f"{_fmt(row['median_step_s'], '.3f')} / {_fmt(row['p95_step_s'], '.3f')} / {_fmt(row['max_step_s'], '.1f')}",
            f"{row['bytes_per_step'] / 1e3:.1f} kB ({100 * row['bytes_per_step'] / row['dense_bytes_per_step']:.1f} %); "
            f"median {row['median_bytes_per_step'] / 1e3:.1f} kB"
            if row["bytes_per_step"] and row["dense_bytes_per_step"] else "-",
            _fmt(None if row["wire_bytes_per_step_per_rank"] is None else row["wire_bytes_per_step_per_rank"] / 1e3, ".1f", " kB"),
            str(sum(max(0, n) for n in row["tcp_retrans_segs"])),
            "yes" if row["bitwise_identical"] else "**no**", same,
        ])
    steps = sum(r["steps"] for r in rows)
    failed = [r["config"] for r in rows if not passed(r)]
    refs = [r["reference"] for r in rows if r.get("reference")]
    ref_lines = []
    if refs:
        ref_lines = ["", "Fault-free reference runs (same cluster settings, no faults): " + "; ".join(
            f"{r['config']} median step {_fmt(r['median_step_s'], '.3f')} s, p95 {_fmt(r['p95_step_s'], '.3f')} s, "
            f"exit codes {' '.join(map(str, r['exit_codes']))}" for r in refs) + "."]
    if failed:
        verdict = f"Steps soaked: {steps} (with faults). FAILED: {', '.join(failed)} (see results/soak.json)."
    else:
        verdict = (f"Steps soaked: {steps} (with faults). Lost: nothing (every rank exited 0, no hang, parameters "
                   "bitwise identical across ranks" + (" and equal to the fault-free runs'" if refs else "") + ").")
    return "\n".join([
        "## Soak: flapping links, rate changes and packet loss",
        "",
        f"Reproduce: `{command}` (as root). Machine: {facts['cpu_cores']} cores shared with other jobs, "
        f"torch {facts['torch']}, gloo. {settings.nodes} emulated nodes (one rank each) on a private bridge, "
        f"links shaped with `tc tbf` to {settings.rate or 'unshaped'} at both ends; `deepreduce train` on a small "
        f"byte-level LM ({' '.join(MODEL[:8]) if not settings.quick else 'tiny'}), {settings.steps} steps per "
        f"configuration, `--timeout {settings.timeout_s:g}` (seconds a collective waits), `--checkpoint` to compare "
        "every rank's final parameters bitwise.",
        "",
        f"Injected while each run trains, from step {plan.start_step} on (past the dense warm-up), "
        f"{_spacing(plan)}, in turn ({', '.join(k for k in plan.kinds if k != 'loss' or settings.loss)}): "
        f"a **flap** (one node's link down for {_span(plan.flap_s)} s, then up: its own interface, its bridge port, "
        "or both, in turn; the node's routes vanish with its interface, and TCP's backed-off retransmissions can "
        "stretch the stall to about twice the outage, still inside the timeout); a **rate change** of every link "
        "(`tc qdisc replace ... tbf` at both ends while traffic flows: 20 Mbit/s, 1 Gbit/s, back to the starting "
        "rate, in turn)" + (f"; **packet loss** on one node's link (1 % or 5 % of frames each way, in turn, "
                            f"{_span(plan.loss_s)} s)" if settings.loss else "") + ". Step times include the stalls. "
        "Bytes/step (collectives): what rank 0 handed to collectives, mean over all steps (dense warm-up, density "
        "warm-up and the final dense flush included; in % of dense), and the median step's. Flaps: count (total "
        "seconds down, shortest-longest; a flap that the run's end cut short counts in the total only). Wire bytes: each node interface's transmit "
        "counter, mean over nodes, per step (framing and TCP retransmissions included; the torchrun rendezvous too). "
        "TCP retrans: retransmitted segments, all nodes. `= fault-free run`: the faulted run's final parameters "
        "equal, bit for bit, those of the same run without faults.",
        "",
        f"**Packet loss on this kernel.** {loss_note}",
        "",
        markdown_table(header, table),
        *ref_lines,
        "",
        verdict,
    ])


LOSS_WORKS = ("Works: nftables (`nft` 1.0.6, package `nftables`) `netdev` ingress chains with `numgen random mod 2^24 "
              "< p*2^24 counter drop` at both ends of a node's veth pair (its `eth0` for what it receives, its bridge "
              "port for what it sends; `NetnsCluster.set_loss`). Checked with 2000 UDP datagrams at p = 20 %: 415 "
              "dropped; the sender is not told, so TCP sees wire loss and retransmits. Also works, at the IP layer only: "
              "`iptables -m statistic --mode random --probability 0.2 -j DROP` on INPUT (iptables 1.8.9; nf_tables back "
              "end: 405 of 2000 dropped; legacy back end: 385). Does not emulate loss: the same rule on OUTPUT (or an "
              "nftables `inet` output-chain drop) fails the sender's own send with EPERM (the UDP sender died after "
              "5 datagrams: `Operation not permitted`), so drops must sit at the receiving end's ingress. Absent from "
              "this kernel: `netem`, and tc's `gact` action (random drops from a tc filter); installing `nftables` "
              "and `iptables` with apt was all that was needed.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="deepreduce bench soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=None, choices=list(SPECS),
                        help="configurations (default: all; --quick: update)")
    parser.add_argument("--nodes", type=int, default=None, help="emulated nodes, one rank each (default 4; --quick 2)")
    parser.add_argument("--rate", default="100mbit", help="starting link rate (default 100mbit)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 2000; --quick 30)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="deepreduce train --timeout, seconds a collective waits (default 60; --quick 30)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds a run may take before it counts as hung (default 1.5 s per step + 900)")
    parser.add_argument("--stall", type=float, default=None,
                        help="seconds without a new step that count as a hang (default 3x --timeout)")
    parser.add_argument("--no-loss", action="store_true", help="inject no packet loss")
    parser.add_argument("--no-reference", action="store_true", help="skip the fault-free run of each configuration")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 nodes, a tiny model, 30 steps, one flap, one rate change (and one loss event)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the checkout's benchmarks/)")
    args = parser.parse_args(argv)

    from ..netns import loss_unavailable_reason, netns_unavailable_reason

    for flag, value in (("--nodes", args.nodes), ("--steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--timeout", args.timeout), ("--deadline", args.deadline), ("--stall", args.stall)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    check_link_rate(parser, "--rate", args.rate, "unshaped")

    console = make_console()
    reason = netns_unavailable_reason()
    if reason:
        console.print(f"[red]deepreduce bench soak needs network namespaces: {reason}")
        return 2
    loss_reason = None if args.no_loss else loss_unavailable_reason()
    loss = not args.no_loss and loss_reason is None
    if loss_reason:
        console.print(f"[yellow]no packet loss: {loss_reason}")
    steps = args.steps if args.steps is not None else (30 if args.quick else 2000)
    timeout = args.timeout if args.timeout is not None else (30.0 if args.quick else 60.0)
    settings = RunSettings(
        nodes=args.nodes if args.nodes is not None else (2 if args.quick else 4),
        rate=None if args.rate == "unshaped" else args.rate, steps=steps, timeout_s=timeout,
        deadline_s=args.deadline if args.deadline is not None else 1.5 * steps + 900,
        stall_s=args.stall if args.stall is not None else 3 * timeout,
        quick=args.quick, loss=loss, seed=args.seed)
    specs = args.specs or (["update"] if args.quick else list(SPECS))
    plan = quick_plan(loss) if args.quick else ChaosPlan()
    out = output_dir(args.out, args.quick)
    scratch = Path(tempfile.mkdtemp(prefix="deepreduce-soak-runs-"))
    port = 29700 + os.getpid() % 200
    rows: list[dict] = []
    for name in specs:
        console.print(f"soak {name}: {settings.nodes} nodes at {settings.rate or 'unshaped'}, {steps} steps, faults ...")
        row = run_once(name, SPECS[name], settings, scratch, port, plan,
                       on_step=lambda s, n=name: print(f"  {n}: step {s}/{steps}", flush=True) if s % 500 == 0 else None)
        row["event_summary"] = event_summary(row["events"])
        if not args.no_reference:
            console.print(f"soak {name}: fault-free reference run ...")
            row["reference"] = run_once(name, SPECS[name], settings, scratch, port + 1, None)
        rows.append(row)
        ev = row["event_summary"]
        console.print(f"  {name}: {row['steps']}/{steps} steps, exit codes {row['exit_codes']}, hang {row['hang'] or 'none'}, "
                      f"median step {_fmt(row['median_step_s'], '.3f')} s, p95 {_fmt(row['p95_step_s'], '.3f')} s, "
                      f"{ev['flaps']} flaps, {ev['rate_changes']} rate changes, {ev['loss_events']} loss events, "
                      f"bitwise identical: {row['bitwise_identical']}"
                      + (f", = fault-free run: {row['reference']['digests'][0] == row['digests'][0]}" if row.get("reference") else ""))
        if row["chaos_errors"]:
            console.print(f"[red]  fault injection errors: {row['chaos_errors']}")
    facts = machine_facts()
    loss_note = (LOSS_WORKS if loss else f"Not injected: {loss_reason or '--no-loss'}.")
    write_json(out / "results" / "soak.json", {"runs": rows, "settings": {**settings.__dict__, "specs": specs},
                                               "plan": plan.__dict__, "packet_loss": loss_note, "machine": facts})
    update_results_section(out / "RESULTS.md", "soak", render(rows, facts, reproduce_command("soak", argv), loss_note, settings, plan))
    console.print(f"wrote {out / 'RESULTS.md'}, {out / 'results' / 'soak.json'}; run logs in {scratch}")
    failed = [r["config"] for r in rows if not passed(r)]
    if failed:
        console.print(f"[red]soak failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

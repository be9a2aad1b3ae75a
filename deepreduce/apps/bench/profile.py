"""Where the time of one compressed step goes: ``deepreduce bench codecs --profile``.

One flat fp32 bucket (ResNet-50 size by default) runs through the real
:class:`~deepreduce.engine.Engine` with error feedback over a loopback transport of ``W``
ranks (every rank's message is this rank's: the decode work is real, the network is
not). After a warm-up step (the residual exists from then on), each phase of the
compressed path is timed with :class:`~deepreduce.phases.PhaseTimer` and the median
over the timed steps is reported, with the whole step's time next to it. Times are the
process's CPU time (run with one torch thread): on a shared machine wall time mostly
measures the neighbours. The step's minor page faults are counted too (where the OS
reports them): a large temporary that the allocator returns to the OS faults its pages
in again on every step, which shows there before it shows in any one phase.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

try:
    import resource
except ImportError:  # not on Windows: no page-fault counts there
    resource = None

import torch

from ... import Compressor
from ...comm import Transport, completed
from ...engine import Engine, Segment
from ...phases import PhaseTimer

# In pipeline order; phases a configuration does not run stay at 0.
PHASES = ["isfinite check", "compensate", "copies", "select", "index encode", "value encode", "framing/CRC",
          "size exchange", "residual update", "decode", "sum"]


class LoopbackTransport(Transport):
    """``world`` ranks that all send what this rank sends (rank 0); collectives complete at once."""

    def __init__(self, world: int) -> None:
        self._world = world
        self.exchanges = 0

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return self._world

    def allgather_sizes(self, nbytes: int) -> list[int]:
        self.exchanges += 1
        return [nbytes] * self._world

    def allgather_async(self, payload: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        payload = self._check_sizes(payload, sizes)
        return completed([payload] * self._world)

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        return completed(tensor.mul_(self._world))

    def barrier(self) -> None:
        pass


def profile_step(spec: str = "topk:0.01/eliasfano/fp16", numel: int = 25_600_000, world: int = 2, steps: int = 3,
                 seed: int = 0, device: torch.device | str = "cpu", tensors: list[int] | None = None,
                 **engine_options: Any) -> dict[str, Any]:
    """Median CPU seconds per phase of one compressed bucket of ``numel`` fp32 elements.

    ``tensors``: the bucket holds tensors of these sizes instead (``numel`` is ignored),
    each compressed on its own as the DDP hook does by default, and those below the
    engine's ``min_numel`` sent raw.

    Returns ``{"phases": {name: s}, "step_s": s, "accounted_s": s, ...}``; ``step_s`` is
    the whole ``reduce(...).wait()``, so ``step_s - accounted_s`` is what no phase names
    (Python overhead, allocations between marks)."""
    if tensors is None:
        segments = [Segment("bucket", 0, numel)]
        engine_options.setdefault("min_numel", 0)
    else:
        offsets = [0]
        for size in tensors:
            offsets.append(offsets[-1] + size)
        segments = [Segment(f"tensor{i}", offset, size) for i, (offset, size) in enumerate(zip(offsets, tensors))]
        numel = offsets[-1]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(device)
    engine = Engine(LoopbackTransport(world), Compressor.from_spec(spec), check=False, **engine_options)
    timer = PhaseTimer()
    per_step: list[dict[str, float]] = []
    step_times, step_faults = [], []
    for step in range(steps + 1):
        grad = base * (1.0 + 0.01 * step)  # a new gradient each step, same scale
        if step:
            engine.phases = timer
            timer.reset()
        faults = minor_page_faults()
        began = time.process_time()
        engine.reduce(grad, segments, key=0).wait()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.process_time() - began
        faulted = None if faults is None else minor_page_faults() - faults
        engine.end_step()
        if step:
            per_step.append(timer.totals())
            step_times.append(elapsed)
            step_faults.append(faulted)
    phases = {name: statistics.median(t.get(name, 0.0) for t in per_step) for name in PHASES}
    stats = engine.stats()
    return {
        "spec": spec, "numel": numel, "tensors": len(segments), "world": world, "steps": steps,
        "phases": phases, "step_s": statistics.median(step_times), "accounted_s": sum(phases.values()),
        "page_faults": None if None in step_faults else statistics.median(step_faults),
        "size_exchanges": engine.transport.exchanges, "payload_bytes": stats["payload_bytes"] // max(stats["compressed_buckets"], 1),
    }


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (None where the OS does not say)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def render_profile(results: list[dict[str, Any]]) -> str:
    """A markdown table: one column per profiled configuration, one row per phase (CPU ms)."""
    from . import markdown_table

    header = ["phase (CPU ms)"] + [r.get("label", r["spec"]) for r in results]
    rows = [[name] + [f"{1e3 * r['phases'][name]:.1f}" for r in results] for name in PHASES]
    rows.append(["sum of phases"] + [f"{1e3 * r['accounted_s']:.1f}" for r in results])
    rows.append(["whole reduce().wait()"] + [f"{1e3 * r['step_s']:.1f}" for r in results])
    rows.append(["page faults per step"] + ["-" if r.get("page_faults") is None else f"{r['page_faults']:.0f}"
                                            for r in results])
    return markdown_table(header, rows)

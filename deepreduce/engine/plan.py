"""``compressor="auto"``: per bucket, dense, fp16 or a sparse spec, whichever the measured
link and the measured encode/decode cost on the real bucket predict to be fastest.

    state = dr.DeepReduceState(compressor="auto")                      # or, with options:
    state = dr.DeepReduceState(compressor=dr.AutoPlan(["topk:0.01/eliasfano/fp16"], tolerance=0.1))

How a bucket is planned, at its first step after ``start_iter`` (the decision is made on
rank 0 and broadcast, so every rank follows the same plan):

1. The link, once per plan, with every rank: two allreduces (a latency-bound 16 KB and
   a bandwidth-bound one, up to 16 MB, the size of the bucket) are timed in fp32 and
   ``seconds = latency + wire bytes / rate`` is fitted (a ring allreduce puts
   ``2 (W-1)/W`` times its input on the wire); the larger one again in fp16, which gloo
   sums at its own speed. (Timing the warm-up's own allreduces does not measure the
   link: a group runs several collectives at once, and DDP overlaps them with the
   backward pass.)
2. The candidates, on the bucket as it arrives: each sparse spec runs what the engine
   would run to send it (finiteness check, error feedback's passes, compression,
   framing) and to receive it (W messages decoded and summed), timed; the message size
   gives the all-gather's wire bytes, ``(W-1)`` times the padded message.
3. Predicted seconds per bucket: dense and ``fp16``: the link model at the bucket's
   wire bytes (fp16: half of them, plus the casts); a sparse spec: sending +
   receiving + the link model at its gather's wire bytes (not eligible where the dense
   fallback would take over). The plan takes the first option, in the order dense,
   fp16, then ``candidates`` as listed, whose prediction is within ``tolerance`` of the
   fastest: list the candidates from the least to the most lossy.

The error budget is the candidate list: list only the specs whose accuracy you accept
(``benchmarks/RESULTS.md`` has measured gaps to dense per spec); ``dense`` and ``fp16``
cost none. Over a fast link (or with fast compute against a slow CPU) the plan is dense,
and the hook then costs what the plain allreduce hook costs, plus a broadcast per bucket
per plan.

Re-planning: every ``check_every`` steps rank 0 compares the median step time of the
last steps with the median after the plan was made; when it moved by more than
``drift`` (the link got slower or faster, another job took the cores), every rank
probes the link again and each bucket is planned again at its next step. A bucket that
goes from sparse to dense or fp16 sends its residual with its next gradient: nothing
is lost. The plan, the fitted link and the predictions are in ``stats()["plan"]`` and
in checkpoints (a resumed run keeps its plan).

Tuning: ``tolerance`` (default 0.05) trades a few percent of predicted time for the less
lossy option; raise it to favour dense. ``check_every=0`` turns re-planning off.
``link=(latency_s, bytes_per_s)`` uses a known link instead of measuring it.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch

from ..compressor import Compressor
from ..errors import ConfigError
from ..wire import pad8
from .framing import frame
from .memory import memory_dtype, subtract_sent
from .messages import all_finite, as_bytes, read_message, stream_name, sum_in_rank_order

if TYPE_CHECKING:
    from .pipeline import Engine
    from .segments import Segment

logger = logging.getLogger(__name__)

DENSE = "dense"
FP16 = "fp16"
DEFAULT_CANDIDATES = ("topk:0.1/eliasfano/fp16", "topk:0.01/eliasfano/fp16")
# A latency-bound and a bandwidth-bound allreduce (fp32 elements). Smaller bandwidth probes
# underrate a fast link: gloo moves large tensors at a better rate than a few MB.
_PROBE_NUMELS = (4096, 1 << 22)


@dataclass(frozen=True)
class Link:
    """``seconds(wire_bytes) = latency_s + wire_bytes / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, wire_bytes: float) -> float:
        return self.latency_s + wire_bytes / self.bytes_per_s


def fit_link(samples: Sequence[tuple[float, float]]) -> Link:
    """Least squares of seconds on wire bytes over ``(wire_bytes, seconds)`` samples; the
    latency is clamped at 0 (with one size, or a non-positive slope, the rate is the
    total bytes over the total time)."""
    samples = [(float(b), float(s)) for b, s in samples if b > 0 and s > 0]
    if not samples:
        raise ValueError("fit_link needs at least one sample with positive bytes and seconds")
    xs, ys = [b for b, _ in samples], [s for _, s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread > 0:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in samples) / spread
        if slope > 0:
            latency = mean_y - slope * mean_x
            if latency >= 0:
                return Link(latency, 1.0 / slope)
            slope = sum(x * y for x, y in samples) / sum(x * x for x in xs)  # through the origin
            return Link(0.0, 1.0 / slope)
    return Link(0.0, sum(xs) / sum(ys))


def allreduce_wire_bytes(nbytes: float, world: int) -> float:
    """Bytes a ring allreduce of ``nbytes`` puts on each rank's link."""
    return 2.0 * (world - 1) / world * nbytes


def choose(predicted: dict[str, float | None], order: Sequence[str], tolerance: float) -> str:
    """The first option of ``order`` whose prediction is within ``tolerance`` of the
    fastest (None: not eligible)."""
    eligible = {name: t for name, t in predicted.items() if t is not None}
    if not eligible:
        raise ValueError("no eligible option to choose from")
    best = min(eligible.values())
    return next(name for name in order if name in eligible and eligible[name] <= best * (1 + tolerance))


class AutoPlan:
    """Per-bucket choice between dense, fp16 and sparse specs (see the module docstring).

    Args:
        candidates: sparse specs (or Compressors), from the least to the most lossy.
        tolerance: take the less lossy option when its predicted time is within this
            fraction of the fastest.
        fp16: offer an fp16 allreduce (fp32 buckets only).
        check_every: steps between drift checks (a one-byte broadcast); 0: never re-plan.
        drift: relative change of the median step time that triggers a re-plan.
        link: ``(latency_s, bytes_per_s)`` of a known link; None: measured.
        seed: seed of the candidates built from spec strings.
    """

    def __init__(self, candidates: Sequence[str | Compressor] = DEFAULT_CANDIDATES, *, tolerance: float = 0.05,
                 fp16: bool = True, check_every: int = 100, drift: float = 0.3,
                 link: tuple[float, float] | None = None, seed: int = 0) -> None:
        if isinstance(candidates, (str, Compressor)):
            candidates = [candidates]
        compressors = []
        for candidate in candidates:
            if candidate in (DENSE, FP16):
                raise ConfigError(f"auto plan candidate {candidate!r} is always considered; list sparse specs only")
            if isinstance(candidate, str):
                try:
                    candidate = Compressor.from_spec(candidate, seed=seed)
                except ConfigError as error:
                    raise ConfigError(f"auto plan candidate: {error}") from None
            if not isinstance(candidate, Compressor):
                raise ConfigError(f"auto plan candidates must be spec strings or Compressors, got {type(candidate).__name__}")
            compressors.append(candidate)
        if not compressors:
            raise ConfigError("auto plan needs at least one sparse candidate spec, e.g. 'topk:0.01/eliasfano/fp16'")
        if len({c.spec for c in compressors}) != len(compressors):
            raise ConfigError(f"auto plan candidates repeat a spec: {[c.spec for c in compressors]}")
        if len({c.seed for c in compressors}) != 1:
            raise ConfigError("auto plan candidates must share one seed")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 10:
            raise ConfigError(f"tolerance must be a number in [0, 10), got {tolerance!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ConfigError(f"check_every must be a non-negative int, got {check_every!r}")
        if isinstance(drift, bool) or not isinstance(drift, (int, float)) or not drift > 0:
            raise ConfigError(f"drift must be a positive number, got {drift!r}")
        if link is not None:
            if (not isinstance(link, (tuple, list)) or len(link) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in link)
                    or link[0] < 0 or link[1] <= 0):
                raise ConfigError(f"link must be (latency_s >= 0, bytes_per_s > 0), got {link!r}")
            link = (float(link[0]), float(link[1]))
        self.compressors = compressors
        self.tolerance = float(tolerance)
        self.fp16 = bool(fp16)
        self.check_every = check_every
        self.drift = float(drift)
        self.given_link = link
        # What was planned (the same on every rank) ...
        self.choices: dict[Hashable, tuple[int, str]] = {}  # bucket key -> (numel, option)
        self.predictions: dict[Hashable, dict[str, float | None]] = {}
        self.link: Link | None = None if link is None else Link(*link)
        self.link_fp16: Link | None = None  # fp16 allreduce (gloo sums fp16 at its own speed); None: as fp32
        self.planned_at: int | None = None
        self.replans = 0
        self._stale: set[Hashable] = set()
        self._reset_timing()

    def _reset_timing(self) -> None:
        self._last_end: float | None = None
        self._window = max(5, min(20, self.check_every // 2 if self.check_every else 20))
        self._recent: deque[float] = deque(maxlen=self._window)
        self._baseline: float | None = None
        self._since_plan: list[float] = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # step timings belong to this process
        state.update(_last_end=None, _recent=deque(maxlen=self._window), _baseline=None, _since_plan=[])
        return state

    @property
    def spec(self) -> str:
        """What the engine reports as its compressor (describe, stats)."""
        return "auto"

    @property
    def options(self) -> list[str]:
        """Every option, from the least to the most lossy."""
        return [DENSE, *([FP16] if self.fp16 else []), *(c.spec for c in self.compressors)]

    def compressor(self, option: str) -> Compressor | None:
        """The Compressor of a sparse option; None for dense and fp16."""
        return next((c for c in self.compressors if c.spec == option), None)

    def describe(self) -> dict[str, Any]:
        return {"candidates": [c.fingerprint for c in self.compressors], "tolerance": self.tolerance, "fp16": self.fp16,
                "check_every": self.check_every, "drift": self.drift, "link": self.given_link}

    def __repr__(self) -> str:
        return f"AutoPlan({[c.spec for c in self.compressors]}, tolerance={self.tolerance})"

    # --- measuring the link --------------------------------------------------------------

    def _probe(self, engine: "Engine", device: torch.device, numel: int) -> None:
        """Time allreduces of a latency-bound and a bandwidth-bound size in fp32, and the
        latter in fp16; fit :attr:`link` and :attr:`link_fp16`. Collective: every rank
        runs it at the same call."""
        transport, world = engine.transport, engine.transport.world_size
        small, large = _PROBE_NUMELS[0], min(max(numel, 4 * _PROBE_NUMELS[0]), _PROBE_NUMELS[1])

        def seconds(count: int, dtype: torch.dtype, runs: int = 2) -> float:
            tensor = torch.zeros(count, dtype=dtype, device=device)
            if count == small:
                transport.allreduce_(tensor)  # settle (connections, in-flight collectives)
            return _seconds(lambda: transport.allreduce_(tensor), device, runs)

        try:
            fp32 = [(allreduce_wire_bytes(count * 4, world), seconds(count, torch.float32, 3 if count == small else 2))
                    for count in (small, large)]
            fp16 = seconds(large, torch.float16) if self.fp16 else None
        except Exception as exc:
            raise engine._failed("probing the link for the auto plan", "auto plan", engine.step, exc) from exc
        self.link = fit_link(fp32)
        self.link_fp16 = None
        if fp16 is not None:
            wire = allreduce_wire_bytes(large * 2, world)
            self.link_fp16 = Link(self.link.latency_s, wire / max(fp16 - self.link.latency_s, 1e-9))

    # --- planning ------------------------------------------------------------------------

    def option_for(self, engine: "Engine", buffer: torch.Tensor, segments: list["Segment"], key: Hashable) -> str:
        """This bucket's option; plans it first where needed (collective: every rank
        reaches a bucket's planning at the same call)."""
        known = self.choices.get(key)
        if known is not None and known[0] == buffer.numel() and key not in self._stale:
            return known[1]
        transport = engine.transport
        if transport.world_size == 1:  # nothing crosses a link: every bucket goes dense (an allreduce of one rank is free)
            self.choices[key] = (buffer.numel(), DENSE)
            self.predictions[key] = {DENSE: 0.0}
            self._stale.discard(key)
            return DENSE
        if self.link is None:  # the same on every rank: unset until the first plan, and after a drift
            self._probe(engine, buffer.device, buffer.numel())
        message = None
        if transport.rank == 0:
            predicted = self._predict(engine, buffer, segments, key)
            option = choose(predicted, self.options, self.tolerance)
            message = json.dumps({"option": option, "predicted": predicted, "link": _pair(self.link),
                                  "link_fp16": _pair(self.link_fp16)}).encode()
            message = torch.frombuffer(bytearray(message), dtype=torch.uint8).to(buffer.device)
        try:
            received = transport.broadcast_varlen(message, 0, device=buffer.device)
        except Exception as exc:
            raise engine._failed("broadcasting the auto plan", key, engine.step, exc) from exc
        plan = json.loads(bytes(received.cpu().numpy().tobytes()))
        option = plan["option"]
        if option not in self.options:
            raise ConfigError(f"auto plan: rank 0 chose {option!r}, which this rank does not offer ({self.options})")
        self.choices[key] = (buffer.numel(), option)
        self.predictions[key] = plan["predicted"]
        self.link, self.link_fp16 = _link(plan["link"]), _link(plan["link_fp16"])  # rank 0's measurement
        self._stale.discard(key)
        if self.planned_at is None or self.planned_at != engine.step:
            self.planned_at = engine.step
            self._reset_timing()
        if transport.rank == 0:
            shown = ", ".join(f"{name} {t * 1e3:.1f} ms" if t is not None else f"{name} -" for name, t in plan["predicted"].items())
            logger.info("deepreduce auto plan, bucket %r (%d elements) at step %d: %s (predicted: %s; link %.3g ms + "
                        "%.3g MB/s)", key, buffer.numel(), engine.step, option, shown, self.link.latency_s * 1e3,
                        self.link.bytes_per_s / 1e6)
        return option

    def _predict(self, engine: "Engine", buffer: torch.Tensor, segments: list["Segment"], key: Hashable) -> dict[str, float | None]:
        """Predicted seconds of each option for this bucket (None: not eligible)."""
        world = engine.transport.world_size
        nbytes = buffer.numel() * buffer.element_size()
        wire = allreduce_wire_bytes(nbytes, world)
        predicted: dict[str, float | None] = {DENSE: self.link.seconds(wire)}
        if self.fp16:
            predicted[FP16] = None
            if buffer.dtype == torch.float32:
                cast_s = _seconds(lambda: buffer.to(torch.float16).to(buffer.dtype), buffer.device)
                predicted[FP16] = (self.link_fp16 or self.link).seconds(wire / 2) + cast_s
        for compressor in self.compressors:
            send_s, receive_s, width = _measure(engine, compressor, buffer, segments)
            fallback = engine.dense_fallback and world * width > 2 * nbytes
            predicted[compressor.spec] = None if fallback else send_s + receive_s + self.link.seconds((world - 1) * width)
        return predicted

    # --- drift -----------------------------------------------------------------------------

    def end_step(self, engine: "Engine") -> None:
        """After each step: time it; every ``check_every`` steps after the plan, rank 0
        says whether the step time drifted (a one-byte broadcast) and, if so, every rank
        probes the link and marks every bucket for planning again."""
        if self.planned_at is None:
            return
        now = time.perf_counter()
        if self._last_end is not None:
            self._recent.append(now - self._last_end)
            if self._baseline is None:
                self._since_plan.append(now - self._last_end)
                if len(self._since_plan) >= self._window + 2:
                    self._baseline = statistics.median(self._since_plan[2:])  # skip the planning steps
                    self._since_plan = []
        self._last_end = now
        since = engine.step - self.planned_at
        if not self.check_every or since <= 0 or since % self.check_every:
            return
        transport = engine.transport
        drifted = (self._baseline is not None and len(self._recent) == self._recent.maxlen
                   and abs(statistics.median(self._recent) / self._baseline - 1) > self.drift)
        flag = torch.tensor([int(drifted) if transport.rank == 0 else 0], dtype=torch.uint8, device=engine.device)
        try:
            drifted = bool(transport.broadcast_async(flag, 0).wait()[0])
        except Exception as exc:
            raise engine._failed("broadcasting the auto plan's drift check", "auto plan", engine.step, exc) from exc
        if not drifted:
            return
        if transport.rank == 0:
            logger.info("deepreduce auto plan: step time moved from %.3f s to %.3f s at step %d; planning again",
                        self._baseline, statistics.median(self._recent), engine.step)
        self.replans += 1
        if self.given_link is None:
            self._probe(engine, engine.device, max(numel for numel, _ in self.choices.values()))
        self._stale = set(self.choices)
        self._reset_timing()

    # --- reporting and checkpoints -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "buckets": {str(key): option for key, (_, option) in self.choices.items()},
            "predicted_s": {str(key): p for key, p in self.predictions.items()},
            "link": None if self.link is None else {"latency_s": self.link.latency_s, "bytes_per_s": self.link.bytes_per_s},
            "fp16_bytes_per_s": None if self.link_fp16 is None else self.link_fp16.bytes_per_s,
            "planned_at": self.planned_at,
            "replans": self.replans,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "choices": [[key, numel, option] for key, (numel, option) in self.choices.items()],
            "predictions": [[key, p] for key, p in self.predictions.items()],
            "link": _pair(self.link),
            "link_fp16": _pair(self.link_fp16),
            "planned_at": self.planned_at,
            "replans": self.replans,
            "stale": list(self._stale),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        options = set(self.options)
        for key, _, option in state["choices"]:
            if option not in options:
                raise ConfigError(f"the checkpoint's auto plan sends bucket {key!r} as {option!r}, which this plan does "
                                  f"not offer ({sorted(options)}); load it with the same candidates")
        self.choices = {_key(key): (int(numel), option) for key, numel, option in state["choices"]}
        self.predictions = {_key(key): p for key, p in state["predictions"]}
        self.link, self.link_fp16 = _link(state["link"]), _link(state.get("link_fp16"))
        self.planned_at = state["planned_at"]
        self.replans = int(state["replans"])
        self._stale = {_key(key) for key in state["stale"]}
        self._reset_timing()


def _pair(link: Link | None) -> list[float] | None:
    return None if link is None else [link.latency_s, link.bytes_per_s]


def _link(pair: Sequence[float] | None) -> Link | None:
    return None if pair is None else Link(*pair)


def _key(key: Any) -> Hashable:
    return tuple(_key(k) for k in key) if isinstance(key, list) else key


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(work, device: torch.device, runs: int = 2) -> float:
    """The fastest of ``runs`` timed runs of ``work()`` (the first also warms caches)."""
    best = float("inf")
    for _ in range(runs):
        _sync(device)
        began = time.perf_counter()
        work()
        _sync(device)
        best = min(best, time.perf_counter() - began)
    return best


def _measure(engine: "Engine", compressor: Compressor, buffer: torch.Tensor,
             segments: list["Segment"]) -> tuple[float, float, int]:
    """(seconds to send, seconds to receive, gather width) of ``compressor`` on this
    bucket as the engine would run it: to send, the finiteness check, error feedback's
    full-size add, the compression of each segment (small ones raw or through the small
    compressor), framing and the residual update; to receive, decoding W messages and
    summing them in rank order (this rank's message decoded W times)."""
    messages: list[torch.Tensor] = []
    wide = memory_dtype(buffer.dtype)

    def send() -> None:
        all_finite(buffer)
        entries = []
        for seg in segments:
            view = buffer.narrow(0, seg.offset, seg.numel)
            if seg.numel < engine.raw_below:
                entries.append(as_bytes(view))
                continue
            compensated = torch.add(view.to(wide), view, alpha=0.0)  # the residual's add: one full pass
            which = engine.small_compressor if seg.is_small(engine.min_numel) else compressor
            result = which.compress_detailed(compensated.to(buffer.dtype), step=engine.step, key=stream_name(seg.name))
            entries.append(result.payload)
            sent = result.sent
            subtract_sent(compensated, sent)  # the residual update
        messages.append(frame(entries, buffer.device))

    send_s = _seconds(send, buffer.device)
    message = messages[-1]
    world = engine.transport.world_size

    def receive() -> None:
        parts = read_message(message, segments, buffer.dtype, engine.raw_below)
        total = torch.zeros(buffer.numel(), dtype=wide, device=buffer.device)
        for i, seg in enumerate(segments):
            sum_in_rank_order(total.narrow(0, seg.offset, seg.numel), [parts[i]] * world, world)
        for _ in range(world - 1):
            read_message(message, segments, buffer.dtype, engine.raw_below)

    receive_s = _seconds(receive, buffer.device)
    return send_s, receive_s, pad8(message.numel())

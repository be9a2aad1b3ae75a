"""The per-step pipeline that every front end runs: one flat buffer ("bucket") at a time.

    engine = Engine(transport, compressor, start_iter=10, min_numel=1024)
    future = engine.reduce(buffer, segments, key=0)   # issues the collectives now
    ...
    averaged = future.wait()                           # buffer, averaged in place
    engine.end_step()                                  # after the last bucket of a step

Per bucket, on every rank::

    first call ever         agreement check (configuration compared across ranks)
    step < start_iter       dense allreduce (warm-up)
    numel < min_numel       dense allreduce (a small bucket is latency-bound)
    not finite anywhere     dense allreduce of the gradient as it came, no error-feedback
                            update (see "Non-finite gradients" below)
    clip_norm               the bucket is scaled to norm <= clip_norm / sqrt(W)   (DGC local clipping)
    otherwise, per segment  (a parameter; a bucket's large parameters, each on its own budget,
                            with pack_tensors; the whole bucket with granularity="bucket")
        numel < min_numel   raw bytes, or ``small_compressor``'s payload when one is set
        else                compensated = segment + residual            (error feedback)
                            payload, sent = compress(compensated as the bucket's dtype)
                            residual = compensated - sent               (sent: what receivers decode)
    frame the entries into one message; then either
      sizes computable      (exact-k sparsifier, codecs that declare their sizes; see
                            engine/presized.py) pad it to the width every rank computed,
                            all-gather at once; flags (failure, non-finite) ride in the
                            message; in the callback: error feedback, decode-and-sum
      else                  all-gather every rank's message size (blocking; a rank whose
                            bucket is not finite sends a flag instead);
                            W * message > 2 * bucket bytes -> dense allreduce instead
                            (every rank saw the same sizes); else one variable-length
                            all-gather, then decode-and-sum in the future's callback
    (the computed path is taken only where W * width <= 2 * bucket bytes, so it never
    needs the dense fallback)

That is the ``"allgather"`` scheme; ``scheme="shared_index"`` sends compressed buckets
through :mod:`deepreduce.engine.shared_index` instead (a rotating leader's indices, one
allreduce of every rank's values there), with the same warm-up, small-bucket, non-finite
and error-feedback rules.

With ``scheme="hierarchical"`` the compressed step runs per node instead
(:mod:`deepreduce.engine.hierarchical`): a dense reduce-scatter inside the node, the
steps above on 1/L of the bucket among the ranks of the same local rank, a dense
all-gather inside the node; ``"hierarchical_shared_index"`` runs the shared-index
allreduce between nodes instead of the all-gather.

Averaging order, the same for every front end: each rank's contribution is divided by W
and then added, in rank order, into an accumulator of the bucket's dtype (fp32 for
fp16/bf16 buckets, rounded once at the end); the dense allreduce divides before it
sums, as torch's built-in hook does. Dividing first keeps fp16 sums from overflowing,
and the fixed rank order gives bitwise-identical results on every rank.

Non-finite gradients behave as under allreduce: if any rank's bucket holds NaN or Inf,
every rank's averaged bucket holds non-finite values at those positions (so AMP's
``GradScaler`` skips the step as it would with plain DDP), and no residual or momentum
buffer takes in that step (the compressed ranks' error feedback is rolled back; logged
once, counted in ``stats()["nonfinite_buckets"]``). ``nonfinite="raise"`` raises
:class:`~deepreduce.NonFiniteError` on every rank instead, naming the ranks, the bucket
and the step.

Segments are named: the name keys the error-feedback memory and the random streams, so
the same parameter gets the same residual and the same random draws wherever it lies in
a bucket, and a parameter is compressed alike by every front end.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from ..comm import Transport
from ..compressor import Compressor
from ..phases import PhaseTimer, mark
from ..errors import CommunicationError, ConfigError, DeepReduceError, NonFiniteError
from ..sparse import SparseGrad
from ..wire import pad8
from .agreement import check_agreement
from .framing import frame
from .memory import ErrorFeedback, memory_dtype
from .messages import all_finite, as_bytes, read_message, stream_name, sum_in_rank_order
from .plan import FP16, AutoPlan
from .presized import FAILED, NONFINITE, add_nonfinite, failed_message, flag_of, message_width, nonfinite_message, pad_to
from .segments import Segment, pack_segments, part_shifts, placed, takes_parts
from .stats import CommStats, log_stats

logger = logging.getLogger(__name__)

_STATE_FORMAT = 2
GRANULARITIES = ("tensor", "bucket")
NONFINITE_POLICIES = ("propagate", "raise")
SIZE_EXCHANGES = ("auto", "always")

# How compressed buckets travel: scheme name -> "module:factory". A factory takes the engine,
# raises ConfigError if the configuration does not suit the scheme, and returns the
# function f(buffer, segments, dense_bytes, key) -> Future that reduces one compressed
# bucket. Imported on first use (no import cycles).
SCHEMES: dict[str, str] = {
    "allgather": "deepreduce.engine.pipeline:_allgather_scheme",
    "shared_index": "deepreduce.engine.shared_index:shared_index_scheme",
    "hierarchical": "deepreduce.engine.hierarchical:hierarchical_scheme",
    "hierarchical_shared_index": "deepreduce.engine.hierarchical:hierarchical_shared_index_scheme",
}
NODE_SCHEMES = ("hierarchical", "hierarchical_shared_index")  # the schemes that group ranks by node


def _allgather_scheme(engine: "Engine") -> Callable[..., torch.futures.Future]:
    return engine._compressed


class Engine:
    """Compressed averaging of flat buffers across the ranks of a :class:`Transport`.

    Args:
        transport: how messages travel, or a zero-argument callable that makes it on
            first use (a torch.distributed group may not exist yet when the front end is
            built).
        compressor: sparsifier + codecs; the same on every rank.
        error_feedback: keep what compression left out and add it to the next step.
        momentum: DGC momentum correction in ``[0, 1)`` (0: off); use with plain SGD.
        start_iter: steps of dense allreduce before compression starts.
        min_numel: buckets with fewer elements are allreduced; inside a compressed
            bucket, segments with fewer elements travel as raw bytes (or through
            ``small_compressor``).
        small_compressor: compresses (a Compressor, or a spec string seeded like
            ``compressor``) the segments below ``min_numel`` (biases, norms)
            instead of sending them raw, with error feedback as for the others. In small
            models they are a large share of the bytes (half of them at 1 % density in a
            0.5 M-parameter transformer); a dense spec with few-bit values, e.g.
            ``"topk:1/strided/uniform:bits=8"`` (every element, 8 bits plus a scale per
            block, no index bits), keeps every element moving each step at a quarter of
            the raw bytes. None: raw.
        dense_fallback: allreduce a bucket whose all-gather would move more bytes
            (``W * message > 2 * bucket bytes``, decided from the exchanged sizes).
        granularity: ``"tensor"``: one top-k per segment (per parameter); ``"bucket"``:
            one top-k over the whole buffer, except that with a ``small_compressor`` the
            segments below ``min_numel`` at the buffer's end keep their own payloads.
        pack_tensors: with ``"tensor"`` and the all-gather scheme, the single-tensor
            segments at or above ``min_numel`` travel as one payload (read where they lie,
            across the segments between them), each segment on its own budget, where that
            leaves what receivers decode unchanged (:meth:`Compressor.packs_parts`:
            ``topk`` or ``blocktopk`` with a lossless index codec and ``raw``, ``bf16``,
            ``fp16`` or ``uniform`` values); a tensor that cannot join starts a new
            payload. One header and one select, encode and decode per payload.
        scheme: how compressed buckets travel: ``"allgather"`` (every rank's payload to
            every rank), ``"shared_index"`` (a rotating leader's indices, one dense
            allreduce of the values there; :mod:`deepreduce.engine.shared_index`) or
            ``"hierarchical"`` (dense inside a node, 1/L of the bucket compressed between
            nodes; :mod:`deepreduce.engine.hierarchical`) or ``"hierarchical_shared_index"``
            (the same, with the shared-index allreduce between nodes).
        average: divide by the world size (else sum).
        density_warmup: steps after ``start_iter`` over which the density falls
            exponentially from 1 to the compressor's ratio (DGC's warm-up); 0: none.
        density_scale: a function of the step giving the factor on the compressor's
            ratio at that step (the density is capped at 1); its mean over the
            compressed steps is the factor on the bytes. The update mode uses it to
            spend a byte budget where the learning rate is high
            (:class:`deepreduce.DensityFollowsLR`). It must return the same number on
            every rank. None: the ratio every step.
        clip_norm: scale each rank's bucket to an L2 norm of at most
            ``clip_norm / sqrt(W)`` before compression (DGC's local gradient clipping,
            per bucket); None: no clipping.
        nonfinite: ``"propagate"`` (as allreduce: a NaN/Inf on any rank reaches every
            rank's average, no residual keeps it) or ``"raise"``
            (:class:`~deepreduce.NonFiniteError` on every rank).
        size_exchange: ``"auto"``: no size exchange before the all-gather where every
            rank can compute every message's size (exact-k sparsifier, codecs that declare
            their sizes, e.g. ``topk/eliasfano/fp16``, ``uniform``, ``qsgd``), so the hook
            never blocks on the slowest rank; ``"always"``: exchange sizes first (the
            smallest padding, one blocking round trip per bucket).
        node_size: processes per node for ``scheme="hierarchical"`` (default: torchrun's
            ``LOCAL_WORLD_SIZE``).
        stats_every: log :meth:`stats` every that many steps (0: never).
        memory: an existing :class:`ErrorFeedback` to use (e.g. shared with a caller).
        check: compare the configuration across ranks at the first call.
        describe_extra: more entries for the agreement check (e.g. the parameter list).
    """

    def __init__(
        self,
        transport: Transport | Callable[[], Transport],
        compressor: Compressor | AutoPlan | str,
        *,
        error_feedback: bool = True,
        momentum: float = 0.0,
        start_iter: int = 0,
        min_numel: int = 1024,
        dense_fallback: bool = True,
        granularity: str = "tensor",
        scheme: str = "allgather",
        average: bool = True,
        density_warmup: int = 0,
        density_scale: Callable[[int], float] | None = None,
        clip_norm: float | None = None,
        nonfinite: str = "propagate",
        size_exchange: str = "auto",
        stats_every: int = 0,
        memory: ErrorFeedback | None = None,
        check: bool = True,
        describe_extra: Mapping[str, Any] | None = None,
        small_compressor: Compressor | str | None = None,
        node_size: int | None = None,
        pack_tensors: bool = True,
    ) -> None:
        plan = AutoPlan() if isinstance(compressor, str) and compressor == "auto" else compressor
        if isinstance(plan, AutoPlan):
            compressor = plan.compressors[-1]  # the most lossy candidate: settings and agreement use it
            _check_plan_settings(scheme=scheme, momentum=momentum, density_warmup=density_warmup,
                                 density_scale=density_scale)
        else:
            plan = None
        if not isinstance(compressor, Compressor):
            raise ConfigError(f"compressor must be a deepreduce.Compressor, an AutoPlan or 'auto', got "
                              f"{type(compressor).__name__ if not isinstance(compressor, str) else repr(compressor)}")
        if isinstance(small_compressor, str):
            try:
                small_compressor = Compressor.from_spec(small_compressor, seed=compressor.seed)
            except ConfigError as error:
                raise ConfigError(f"small_compressor: {error}") from None
        if small_compressor is not None and not isinstance(small_compressor, Compressor):
            raise ConfigError(f"small_compressor must be a deepreduce.Compressor, a spec string or None, "
                              f"got {type(small_compressor).__name__}")
        if small_compressor is not None and small_compressor.ratio == 0 and small_compressor.sparsifier.exact_k:
            raise ConfigError(f"small_compressor {small_compressor.spec}: ratio 0 sends nothing; use ratio 1 (e.g. "
                              "'topk:1/strided/uniform:bits=8')")
        for name, value in (("start_iter", start_iter), ("min_numel", min_numel), ("stats_every", stats_every),
                            ("density_warmup", density_warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative int, got {value!r}")
        for name, value in (("error_feedback", error_feedback), ("dense_fallback", dense_fallback), ("average", average),
                            ("pack_tensors", pack_tensors)):
            if not isinstance(value, bool):  # a string such as "no" would count as True
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        if density_scale is not None and not callable(density_scale):
            raise ConfigError(f"density_scale must be a function of the step or None, got {type(density_scale).__name__}")
        if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and not isinstance(clip_norm, bool)
                                          and math.isfinite(clip_norm) and clip_norm > 0):
            raise ConfigError(f"clip_norm must be a finite positive number or None, got {clip_norm!r}")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
        if size_exchange not in SIZE_EXCHANGES:
            raise ConfigError(f"size_exchange must be one of {SIZE_EXCHANGES}, got {size_exchange!r}")
        if compressor.ratio == 0 and compressor.sparsifier.exact_k:
            raise ConfigError(
                f"compressor {compressor.spec}: ratio 0 sends nothing, every gradient would stay in the residual; "
                "use a positive ratio (e.g. 0.01)"
            )
        if node_size is not None and scheme not in NODE_SCHEMES:
            raise ConfigError(f"node_size applies to scheme='hierarchical' (or 'hierarchical_shared_index'), not to "
                              f"scheme={scheme!r}")
        if not (isinstance(transport, Transport) or callable(transport)):
            raise ConfigError(f"transport must be a deepreduce.comm.Transport, got {type(transport).__name__}")
        self._transport = transport if isinstance(transport, Transport) else None
        self._make_transport = None if isinstance(transport, Transport) else transport
        self.compressor = compressor
        self.plan = plan
        self._bucket_compressor: Compressor | None = None  # the plan's choice for the bucket being encoded
        self.device = torch.device("cpu")  # of the last bucket (for the plan's collectives)
        self.small_compressor = small_compressor
        try:
            self.memory = memory if memory is not None else ErrorFeedback(enabled=error_feedback, momentum=momentum)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.dense_fallback = bool(dense_fallback)
        self.granularity = granularity
        self.pack_tensors = pack_tensors
        self.scheme = scheme
        self.average = bool(average)
        self.density_warmup = density_warmup
        self.density_scale = density_scale
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.nonfinite = nonfinite
        self.size_exchange = size_exchange
        self._widths: dict[tuple, int | None] = {}  # computed gather widths per bucket layout
        self._packings: dict[tuple, list[Segment]] = {}  # pack_tensors' segments per (spec, bucket layout)
        self._placements: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per gathered segment and device
        self._warned_nonfinite = False
        self.stats_every = stats_every
        self.check = bool(check)
        self.describe_extra = dict(describe_extra or {})
        self.step = 0
        self._stats = CommStats()
        self._agreed = not self.check
        self._ramp: tuple[int, Compressor] | None = None  # (step, compressor at that step's density)
        self.node_size = node_size
        module, _, factory = SCHEMES[scheme].partition(":")
        self._reduce_compressed = getattr(importlib.import_module(module), factory)(self)
        self.phases: PhaseTimer | None = None  # set to profile the phases of compressed buckets

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = self._make_transport()
        return self._transport

    def __getstate__(self) -> dict[str, Any]:
        """Configuration, residuals, step and stats. A transport made by a factory is left
        out and made again on first use in the process that unpickles (a process group
        belongs to one process); the configuration is compared across ranks again."""
        state = self.__dict__.copy()
        if self._make_transport is not None:
            state["_transport"] = None
        state["_agreed"] = not self.check
        state["_ramp"] = None
        state["phases"] = None
        state["_placements"] = {}  # device tensors, made again on first use
        return state

    # --- configuration agreement ---------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Everything ranks must agree on, as plain data."""
        c = self.compressor
        return {
            "compressor": (self.plan or c).spec,
            "seed": c.seed,
            "fingerprint": c.fingerprint,
            "plan": None if self.plan is None else self.plan.describe(),
            "small_compressor": None if self.small_compressor is None else [self.small_compressor.spec,
                                                                            self.small_compressor.fingerprint],
            "start_iter": self.start_iter,
            "min_numel": self.min_numel,
            "error_feedback": self.memory.enabled,
            "momentum": self.memory.momentum,
            "dense_fallback": self.dense_fallback,
            "granularity": self.granularity,
            "pack_tensors": self.pack_tensors,
            "scheme": self.scheme,
            "average": self.average,
            "density_warmup": self.density_warmup,
            # a function cannot be compared: its densities at a few steps stand for it
            "density_scale": None if self.density_scale is None else [
                self.density(self.start_iter + offset) for offset in (0, 1, 10, 100, 1000, 10000)],
            "clip_norm": self.clip_norm,
            "nonfinite": self.nonfinite,
            "size_exchange": self.size_exchange,
            **getattr(self._reduce_compressed, "describe", dict)(),  # a scheme's own settings
            **self.describe_extra,
        }

    def check_agreement(self) -> None:
        """Compare :meth:`describe` across ranks; ConfigError on every rank if they differ.
        Collective."""
        check_agreement(self.transport, self.describe())
        self._agreed = True
        setup = getattr(self._reduce_compressed, "setup", None)
        if setup is not None:
            setup(self.transport)  # a scheme's sub-groups: made here, at the same call on every rank

    # --- one bucket ----------------------------------------------------------------------

    def reduce(self, buffer: torch.Tensor, segments: Sequence[Segment] | None = None, *, key: Hashable = 0) -> torch.futures.Future:
        """Average (or sum) the flat ``buffer`` over all ranks, in place.

        Issues every collective before returning (so a DDP hook may call it); the
        future completes with ``buffer``. ``segments`` split the buffer into separately
        compressed, named parts (default: one segment named ``key``)."""
        if buffer.dim() != 1:
            raise ValueError(f"reduce expects a flat (1-D) buffer, got shape {tuple(buffer.shape)}")
        if not self._agreed:
            self.check_agreement()
        if not self._stats.steady_marked and self.step >= self.start_iter + max(self.density_warmup - 1, 0):
            self._stats.mark_steady()
        numel = buffer.numel()
        dense_bytes = numel * buffer.element_size()
        self.device = buffer.device
        self._stats.add(buckets=1, dense_bytes=dense_bytes)
        if self.step < self.start_iter or numel < self.min_numel:
            warmup = self.step < self.start_iter
            self._stats.add(sent_bytes=dense_bytes, warmup_buckets=int(warmup), small_buckets=int(not warmup))
            if self.scheme in NODE_SCHEMES:  # an allreduce over every rank: it crosses the nodes
                self._stats.add(inter_node_bytes=dense_bytes)
            future = self._allreduce(buffer, key)
            return self._checked(future, key) if self.nonfinite == "raise" else future
        segments = self._segments(buffer, segments, key)
        if self.plan is not None:
            return self._planned(buffer, segments, dense_bytes, key)
        return self._reduce_compressed(buffer, segments, dense_bytes, key)

    def _planned(self, buffer: torch.Tensor, segments: list[Segment], dense_bytes: int, key: Hashable) -> torch.futures.Future:
        """A bucket under ``compressor="auto"``: the plan's option (planned here first
        where needed). Dense and fp16 buckets first take back their residuals."""
        option = self.plan.option_for(self, buffer, segments, key)
        compressor = self.plan.compressor(option)
        if compressor is not None:
            self._bucket_compressor = compressor
            try:
                return self._reduce_compressed(buffer, segments, dense_bytes, key)
            finally:
                self._bucket_compressor = None
        for seg in segments:
            self.memory.flush(seg.name, buffer.narrow(0, seg.offset, seg.numel), seg.parts)
        half = option == FP16
        self._stats.add(sent_bytes=dense_bytes // 2 if half else dense_bytes, planned_dense_buckets=1)
        future = self._allreduce_fp16(buffer, key) if half else self._allreduce(buffer, key)
        return self._checked(future, key) if self.nonfinite == "raise" else future

    def _allreduce_fp16(self, buffer: torch.Tensor, key: Hashable) -> torch.futures.Future:
        """Allreduce in fp16 (divided by W before the cast, as torch's fp16 hook does),
        written back into ``buffer``."""
        half = buffer.to(torch.float16)
        if self.average:
            half.div_(self.transport.world_size)
        try:
            future = self.transport.allreduce_async(half)
        except Exception as exc:
            raise self._failed("the fp16 allreduce", key, self.step, exc) from exc

        def widen(done: torch.futures.Future) -> torch.Tensor:
            value = done.value()
            return buffer.copy_(value[0] if isinstance(value, list) else value)

        return self._guarded(future, "the fp16 allreduce", key).then(widen)

    def _failed(self, what: str, key: Hashable, step: int, exc: BaseException) -> CommunicationError:
        return CommunicationError(f"deepreduce: bucket {key!r} at step {step}: {what} failed "
                                  f"(a peer died, a link is down, or the process group's timeout passed): {exc}")

    def _guarded(self, future: torch.futures.Future, what: str, key: Hashable) -> torch.futures.Future:
        """``future``, its failure re-raised naming the bucket and step."""
        step = self.step

        def value(done: torch.futures.Future) -> Any:
            try:
                return done.value()
            except Exception as exc:
                raise self._failed(what, key, step, exc) from exc

        return future.then(value)

    def _checked(self, future: torch.futures.Future, key: Hashable) -> torch.futures.Future:
        """``future``, failing with NonFiniteError if its result is not finite. (A
        ``then`` callback keeps the future's CUDA stream semantics; its error reaches
        the waiter wrapped in a RuntimeError that carries the message.)"""
        step = self.step

        def check(done: torch.futures.Future) -> torch.Tensor:
            value = done.value()
            averaged = value[0] if isinstance(value, list) else value
            if not all_finite(averaged):
                raise NonFiniteError(f"deepreduce: bucket {key!r} at step {step}: the allreduced gradient is not "
                                     "finite (a rank's gradient held NaN or Inf)")
            return averaged

        return future.then(check)

    def end_step(self) -> None:
        """Close a step (after its last bucket): advances the step that seeds the random
        streams and counts warm-up, and logs stats every ``stats_every`` steps."""
        self.step += 1
        self._stats.add(steps=1)
        if self.plan is not None:
            self.plan.end_step(self)
        if self.stats_every and self.step % self.stats_every == 0:
            log_stats(self._stats.as_dict(), prefix=f"deepreduce rank {self.transport.rank} step {self.step}")

    def _segments(self, buffer: torch.Tensor, segments: Sequence[Segment] | None, key: Hashable) -> list[Segment]:
        if segments is None:
            return [Segment(key, 0, buffer.numel())]
        segments = list(segments)
        end = 0
        for seg in segments:
            if seg.offset != end or seg.numel < 0:
                raise ValueError(f"segments must tile the buffer in order; {seg} starts at {seg.offset}, expected {end}")
            end += seg.numel
        if end != buffer.numel():
            raise ValueError(f"segments cover {end} elements, the buffer has {buffer.numel()}")
        if self.granularity == "tensor":
            return self._packed(segments)
        if self.granularity == "bucket" and len(segments) > 1:
            # One top-k over the bucket; memory kept per part, so a new layout loses nothing.
            # With a small compressor the small segments at the end keep their own payloads
            # (the front ends that lay out their own buffers put every small tensor there).
            end = len(segments)
            while self.small_compressor is not None and end and segments[end - 1].is_small(self.min_numel):
                end -= 1
            if end < 2:
                return segments
            parts = tuple(part for seg in segments[:end] for part in (seg.parts or ((seg.name, seg.numel),)))
            merged = Segment(tuple(name for name, _ in parts), 0, sum(seg.numel for seg in segments[:end]), parts=parts)
            return [merged, *segments[end:]]
        return segments

    def _packed(self, segments: list[Segment]) -> list[Segment]:
        """``segments`` with their single tensors at or above ``min_numel`` gathered into
        segments of per-part budgets (``pack_tensors``), each run as long as the compressor
        can carry it part by part with receivers decoding what per-tensor payloads give
        (``Compressor.packs_parts``), under the all-gather scheme. Decided from sizes and
        the step's density alone, so every rank merges alike."""
        if not self.pack_tensors or self.scheme != "allgather" or self.plan is not None or len(segments) < 2:
            return segments
        compressor = self._step_compressor()  # its density decides the counts a value codec must pack
        if not takes_parts(compressor):
            return segments  # a wrapped compress_detailed without ``parts``: one payload per tensor, as before
        layout = (compressor.spec, tuple(segments))
        if layout not in self._packings:
            if len(self._packings) > 64:  # one entry per density and bucket: keep the cache small
                self._packings.clear()
                self._placements.clear()
            self._packings[layout] = pack_segments(segments, compressor, self.min_numel)
        return self._packings[layout]

    def _placed(self, sparse: SparseGrad, seg: Segment, target: torch.Tensor) -> SparseGrad:
        """A gathered segment's decoded elements at their places in ``target`` (the bucket)."""
        key = (seg, target.device)
        if key not in self._placements:
            self._placements[key] = part_shifts(seg, target.device)
        return placed(sparse, self._placements[key], target.numel())

    @property
    def raw_below(self) -> int:
        """Segments with fewer elements travel as raw bytes inside a compressed bucket."""
        return self.min_numel if self.small_compressor is None else 0

    def density(self, step: int | None = None) -> float:
        """The density compressed buckets use at ``step`` (default: the current one)."""
        step = self.step if step is None else step
        target = self.compressor.ratio
        if self.density_scale is not None:
            target = _scaled_density(target, self.density_scale(step))
        done = step - self.start_iter + 1
        if not self.density_warmup or done >= self.density_warmup or target <= 0:
            return target
        return target ** (max(done, 0) / self.density_warmup)

    def _step_compressor(self) -> Compressor:
        if self._bucket_compressor is not None:
            return self._bucket_compressor
        ramping = self.density_warmup and self.step - self.start_iter + 1 < self.density_warmup
        if self.density_scale is None and not ramping:
            return self.compressor
        if self._ramp is None or self._ramp[0] != self.step:
            density = self.density()
            same = density == self.compressor.ratio
            self._ramp = (self.step, self.compressor if same else self.compressor.with_ratio(density))
            if len(self._widths) > 64:  # widths are cached per density: keep the cache small
                self._widths.clear()
        return self._ramp[1]

    def _clip(self, buffer: torch.Tensor) -> None:
        limit = self.clip_norm / self.transport.world_size ** 0.5
        norm = float(torch.linalg.vector_norm(buffer, dtype=torch.float32))
        if norm > limit:
            buffer.mul_(limit / norm)

    def _allreduce(self, buffer: torch.Tensor, key: Hashable, transport: Transport | None = None) -> torch.futures.Future:
        transport = transport or self.transport
        if self.average:
            buffer.div_(transport.world_size)  # before the sum: fp16 sums of W gradients may overflow
        try:
            future = transport.allreduce_async(buffer)
        except Exception as exc:
            raise self._failed("the dense allreduce", key, self.step, exc) from exc
        return self._guarded(future, "the dense allreduce", key)

    def _allgather_sizes(self, size: int, key: Hashable, transport: Transport | None = None) -> list[int]:
        self._stats.add(size_exchanges=1)
        try:
            return (transport or self.transport).allgather_sizes(size)
        except Exception as exc:
            raise self._failed("exchanging payload sizes", key, self.step, exc) from exc

    def _width(self, buffer: torch.Tensor, segments: list[Segment], compressor: Compressor, dense_bytes: int,
               transport: Transport) -> int | None:
        """The gather width every rank computes for this bucket, or None: exchange sizes."""
        if self.size_exchange != "auto":
            return None
        layout = (compressor.spec, buffer.dtype, transport.world_size,
                  tuple((seg.numel, seg.part_numels, seg.is_small(self.min_numel)) for seg in segments))
        if layout not in self._widths:
            width = message_width(compressor, layout[3], buffer.dtype, self.min_numel, self.small_compressor)
            # Where the padded gather might lose to allreduce, the exchanged sizes decide.
            if width is not None and self.dense_fallback and transport.world_size * width > 2 * dense_bytes:
                width = None
            self._widths[layout] = width
        return self._widths[layout]

    def _compressed(self, buffer: torch.Tensor, segments: list[Segment], dense_bytes: int,
                    key: Hashable, transport: Transport | None = None, finite: bool | None = None) -> torch.futures.Future:
        """Compress, exchange and average ``buffer`` across the ranks of ``transport``
        (default: the engine's; a scheme passes a sub-group's). ``finite``: whether to treat
        the bucket as finite (default: checked here; a scheme may have decided for a wider
        group, e.g. a node)."""
        transport = transport or self.transport
        width = self._width(buffer, segments, self._step_compressor(), dense_bytes, transport)
        if width is not None:
            return self._compressed_presized(buffer, segments, width, key, transport, finite)
        timer = self.phases
        if timer is not None:
            timer.start()
        started = time.perf_counter()
        finite = all_finite(buffer) if finite is None else finite
        mark(timer, "isfinite check")
        if not finite:
            return self._nonfinite(buffer, segments, [], self._allgather_sizes(NONFINITE, key, transport), key,
                                   dense_bytes, transport)
        if self.clip_norm is not None:
            self._clip(buffer)
        compressor = self._step_compressor()
        pending: list[tuple[torch.Tensor, torch.Tensor, Any] | None] = []
        try:
            entries = self._encode(buffer, segments, compressor, pending, self.step, timer)
            message = frame(entries, buffer.device)
            mark(timer, "framing/CRC")
        except Exception:
            # Tell the other ranks, or they would wait for this rank's size until timeout.
            self._allgather_sizes(FAILED, key, transport)
            raise
        encoded = time.perf_counter()
        sizes = self._allgather_sizes(message.numel(), key, transport)
        exchanged = time.perf_counter()
        mark(timer, "size exchange")
        if FAILED in sizes:
            failed = ", ".join(str(r) for r, n in enumerate(sizes) if n == FAILED)
            raise DeepReduceError(f"deepreduce: rank {failed} failed to compress bucket {key!r} at step {self.step} (see its error)")
        if NONFINITE in sizes:
            return self._nonfinite(buffer, segments, pending, sizes, key, dense_bytes, transport)
        width = pad8(max(sizes))

        if self.dense_fallback and transport.world_size * width > 2 * dense_bytes:
            for seg, entry in zip(segments, pending):
                if entry is not None:
                    compensated, to_send, _ = entry
                    seg.write(buffer, to_send)
                    self.memory.update_dense(seg.name, compensated, to_send)
            self._stats.add(dense_fallbacks=1, sent_bytes=dense_bytes, compress_s=encoded - started, exchange_s=exchanged - encoded)
            return self._allreduce(buffer, key, transport)

        own, kept = self._update_residuals(segments, pending)
        mark(timer, "residual update")
        self._stats.add(
            compressed_buckets=1, sent_bytes=width, payload_bytes=message.numel(), numel=buffer.numel(), kept=kept,
            compress_s=time.perf_counter() - started - (exchanged - encoded), exchange_s=exchanged - encoded,
        )
        try:
            gathered = transport.allgather_async(message, sizes)
        except Exception as exc:
            raise self._failed("the all-gather", key, self.step, exc) from exc
        step = self.step

        def decode(done: torch.futures.Future) -> torch.Tensor:
            try:
                messages = done.value()
            except Exception as exc:
                raise self._failed("the all-gather", key, step, exc) from exc
            return self._decode_and_sum(messages, buffer, segments, own, transport.rank)

        return gathered.then(decode)

    def _encode(self, buffer: torch.Tensor, segments: list[Segment], compressor: Compressor, pending: list,
                step: int, timer: PhaseTimer | None) -> list[torch.Tensor]:
        """Each segment's wire entry: raw bytes below ``raw_below``, else the payload of its
        compensated values (the small ones through ``small_compressor``). ``pending`` gets,
        per segment, None or ``(compensated, sent as the bucket's dtype, Compressed)``: the
        residual is updated from it once the step's fate is known."""
        entries: list[torch.Tensor] = []
        for seg in segments:
            view = seg.views(buffer)
            small = seg.is_small(self.min_numel)
            if small and self.small_compressor is None:
                entries.append(as_bytes(view))
                pending.append(None)
                continue
            compensated = self.memory.compensate(seg.name, view, seg.parts)  # consumes the residual
            mark(timer, "compensate")
            to_send = compensated.to(buffer.dtype)  # the wire carries the bucket's dtype (fp16 stays fp16)
            mark(timer, "copies")
            segment_compressor = self.small_compressor if small else compressor
            packed = {} if seg.part_numels is None else {"parts": seg.part_numels}
            result = segment_compressor.compress_detailed(to_send, step=step, key=stream_name(seg.name),
                                                          **packed, **_timed(timer))
            entries.append(result.payload)
            pending.append((compensated, to_send, result))
        return entries

    def _update_residuals(self, segments: list[Segment], pending: list) -> tuple[list[SparseGrad | None], int]:
        """Residual = compensated - sent, per compressed segment; returns what this rank
        sent (for its own decode) and the elements kept."""
        own: list[SparseGrad | None] = []
        kept = 0
        for seg, entry in zip(segments, pending):
            if entry is None:
                own.append(None)
                kept += seg.numel
                continue
            compensated, _, result = entry
            self.memory.update(seg.name, compensated, result.sent)
            own.append(result.sent)
            kept += result.sent.k
        return own, kept

    def _compressed_presized(self, buffer: torch.Tensor, segments: list[Segment], width: int,
                             key: Hashable, transport: Transport, finite: bool | None = None) -> torch.futures.Future:
        """The compressed path without a size exchange: every rank pads its message to
        ``width`` and issues the all-gather at once; failure and non-finite flags travel
        in the messages, and the error-feedback update waits for the gather (the callback),
        where every rank has seen every flag. Errors -- this rank's compression failing,
        another rank's, ``nonfinite="raise"`` -- reach every rank through the future, so
        every rank issues the same collectives for the rest of the step before raising."""
        timer = self.phases
        if timer is not None:
            timer.start()
        started = time.perf_counter()
        step = self.step
        finite = all_finite(buffer) if finite is None else finite
        mark(timer, "isfinite check")
        # Bytes handed to the gather count now, whatever the callback finds (it runs when
        # the gather completes, on the backend's thread: counting there would make the
        # per-step figures depend on timing).
        self._stats.add(sent_bytes=width)
        pending: list[tuple[torch.Tensor, torch.Tensor, Any] | None] = []
        if not finite:
            message, payload_bytes = nonfinite_message(buffer, width), 0
        else:
            if self.clip_norm is not None:
                self._clip(buffer)
            compressor = self._step_compressor()
            try:
                entries = self._encode(buffer, segments, compressor, pending, step, timer)  # residuals: in the callback
                framed = frame(entries, buffer.device)
                payload_bytes = framed.numel()
                message = pad_to(framed, width)
                mark(timer, "framing/CRC")
            except Exception as exc:
                self._restore(segments, pending)
                # The other ranks gather this bucket, and then the next ones: join this gather
                # with the failure flag and fail through the future. (Raising here would end
                # this rank's backward pass before its next buckets' collectives, and leave the
                # other ranks waiting in them.)
                error = exc

                def fail(_: torch.futures.Future) -> torch.Tensor:
                    raise error

                return self._gather(failed_message(width, buffer.device), width, key, transport).then(fail)
        gathered = self._gather(message, width, key, transport)
        encoded = time.perf_counter()

        def finish(done: torch.futures.Future) -> torch.Tensor:
            if timer is not None:
                timer.start()
            try:
                messages = done.value()
            except Exception as exc:
                self._restore(segments, pending)
                raise self._failed("the all-gather", key, step, exc) from exc
            flags = [flag_of(m) for m in messages]
            if FAILED in flags:
                self._restore(segments, pending)
                failed = ", ".join(str(r) for r, f in enumerate(flags) if f == FAILED)
                raise DeepReduceError(f"deepreduce: rank {failed} failed to compress bucket {key!r} at step {step} (see its error)")
            if NONFINITE in flags:
                ranks = [r for r, f in enumerate(flags) if f == NONFINITE]
                self._nonfinite_seen(segments, pending, ranks, key, step, 0)
                return self._nonfinite_sum(messages, ranks, buffer)
            own, kept = self._update_residuals(segments, pending)
            mark(timer, "residual update")
            self._stats.add(compressed_buckets=1, payload_bytes=payload_bytes, numel=buffer.numel(),
                            kept=kept, compress_s=encoded - started)
            return self._decode_and_sum(messages, buffer, segments, own, transport.rank, padded=True)

        return gathered.then(finish)

    def _gather(self, message: torch.Tensor, width: int, key: Hashable, transport: Transport) -> torch.futures.Future:
        try:
            return transport.allgather_async(message, [width] * transport.world_size)
        except Exception as exc:
            raise self._failed("the all-gather", key, self.step, exc) from exc

    def _restore(self, segments: list[Segment], pending: list) -> None:
        """Undo this step's :meth:`ErrorFeedback.compensate` of every compressed segment."""
        for seg, entry in zip(segments, pending):
            if entry is not None:
                self.memory.restore(seg.name, entry[0])

    def _nonfinite_sum(self, messages: list[torch.Tensor], ranks: list[int], buffer: torch.Tensor) -> torch.Tensor:
        """The averaged bucket of a step where ``ranks`` were not finite (computed path):
        their non-finite values at their positions (summed in rank order: +Inf and -Inf
        make NaN, as in allreduce), zeros elsewhere."""
        accumulate = memory_dtype(buffer.dtype)
        exact = accumulate == buffer.dtype
        total = buffer.zero_() if exact else torch.zeros(buffer.numel(), dtype=accumulate, device=buffer.device)
        for rank in ranks:
            add_nonfinite(total, messages[rank], rank)
        if not exact:
            buffer.copy_(total)
        return buffer

    def _nonfinite_seen(self, segments: list[Segment], pending: list, ranks: list[int], key: Hashable, step: int,
                        sent_bytes: int) -> None:
        """Some rank's bucket is not finite: drop this step's error feedback, then raise
        (``nonfinite="raise"``) or log it once and count it."""
        self._restore(segments, pending)
        where = f"bucket {key!r} at step {step}: the gradient of rank {', '.join(map(str, ranks))} is not finite"
        if self.nonfinite == "raise":
            raise NonFiniteError(f"deepreduce: {where} (NaN or Inf)")
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            logger.warning("deepreduce: %s; averaging it without compression and keeping no error feedback for it "
                           "(AMP skips such steps; later ones are counted in stats()['nonfinite_buckets'])", where)
        self._stats.add(nonfinite_buckets=1, sent_bytes=sent_bytes)

    def _nonfinite(self, buffer: torch.Tensor, segments: list[Segment], pending: list, sizes: list[int],
                   key: Hashable, dense_bytes: int, transport: Transport | None = None) -> torch.futures.Future:
        """Some rank's bucket is not finite (seen in the size exchange): drop this step's
        error feedback everywhere, then raise or allreduce the buckets as they came (the
        non-finite values reach every rank at their positions, as with plain allreduce)."""
        ranks = [r for r, n in enumerate(sizes) if n == NONFINITE]
        self._nonfinite_seen(segments, pending, ranks, key, self.step, dense_bytes)
        return self._allreduce(buffer, key, transport)

    def _decode_and_sum(self, messages: list[torch.Tensor], buffer: torch.Tensor, segments: list[Segment],
                        own: list[SparseGrad | None], rank: int | None = None, padded: bool = False) -> torch.Tensor:
        """The one place payloads are decoded and summed: rank order, divide then add."""
        began = time.perf_counter()
        timer = self.phases
        if timer is not None:
            timer.start()
        world, rank = len(messages), self.transport.rank if rank is None else rank
        decoded = [read_message(message, segments, buffer.dtype, self.raw_below, source, own if source == rank else None,
                                padded) for source, message in enumerate(messages)]
        mark(timer, "decode")
        accumulate = memory_dtype(buffer.dtype)
        exact = accumulate == buffer.dtype
        total = buffer.zero_() if exact else torch.zeros(buffer.numel(), dtype=accumulate, device=buffer.device)
        for i, seg in enumerate(segments):
            divisor = world if self.average else 1
            if seg.spans is None:
                sum_in_rank_order(total.narrow(0, seg.offset, seg.numel), [parts[i] for parts in decoded], divisor)
            else:
                sum_in_rank_order(total, [self._placed(parts[i], seg, total) for parts in decoded], divisor)
        mark(timer, "sum")
        if not exact:
            buffer.copy_(total)
            mark(timer, "copies")
        self._stats.add(decompress_s=time.perf_counter() - began)
        return buffer

    # --- bookkeeping ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since the start (or the checkpoint); see :mod:`deepreduce.engine.stats`."""
        out = self._stats.as_dict()
        out["step"] = self.step
        out["compressor"] = (self.plan or self.compressor).spec
        if self.plan is not None:
            out["plan"] = self.plan.stats()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Residuals, step and stats (tensors on the CPU). Residuals belong to one rank."""
        c = self.compressor
        return {
            "format": _STATE_FORMAT,
            "step": self.step,
            "memory": self.memory.state_dict(),
            "stats": self._stats.state_dict(),
            "compressor": {"spec": c.spec, "seed": c.seed, "fingerprint": c.fingerprint},
            "plan": None if self.plan is None else self.plan.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") not in (1, _STATE_FORMAT):
            raise ValueError(f"not a deepreduce engine state dict (format {_STATE_FORMAT}): got {type(state).__name__}")
        missing = [key for key in ("compressor", "step", "memory", "stats") if key not in state]
        saved = state.get("compressor")
        if not missing and isinstance(saved, Mapping):
            missing = [f"compressor.{key}" for key in ("fingerprint", "spec", "seed") if key not in saved]
        if missing or not isinstance(saved, Mapping):
            raise ValueError(f"deepreduce engine state dict: missing or malformed {', '.join(missing) or 'compressor'}")
        if saved["fingerprint"] != self.compressor.fingerprint:
            logger.warning("loading state saved with compressor %s seed=%s into %r; residuals are kept",
                           saved["spec"], saved["seed"], self.compressor)
        self.step = int(state["step"])
        self.memory.load_state_dict(state["memory"])
        self._stats.load_state_dict(state["stats"])
        if self.plan is not None and state.get("plan") is not None:
            self.plan.load_state_dict(state["plan"])


def positive_number(value: Any) -> float | None:
    """``value`` (a Python, numpy or 0-d torch number) as a float if it is positive and
    finite, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _scaled_density(ratio: float, factor: float) -> float:
    """``ratio * factor`` capped at 1, to 3 significant digits (a few hundred distinct
    densities over a run, not one per step: each one's gather width is computed once)."""
    value = positive_number(factor)
    if value is None:
        raise ConfigError(f"density_scale returned {factor!r}; it must return a positive finite number")
    density = min(1.0, ratio * value)
    return float(f"{density:.3g}")


def _check_plan_settings(*, scheme: str, momentum: float, density_warmup: int,
                         density_scale: Callable[[int], float] | None = None) -> None:
    """ConfigError for settings ``compressor="auto"`` cannot honour."""
    if scheme != "allgather":
        raise ConfigError(f"compressor='auto' plans buckets for scheme='allgather'; scheme={scheme!r} takes a spec")
    if momentum:
        raise ConfigError("compressor='auto' cannot keep DGC momentum correction (a bucket planned dense would drop "
                          "the momentum it moved out of the optimizer); use momentum=0 with a momentum optimizer")
    if density_warmup or density_scale is not None:
        raise ConfigError("compressor='auto' plans the density itself; use density_warmup=0 and density_scale=None")


def _timed(timer: PhaseTimer | None) -> dict[str, PhaseTimer]:
    """``timer=`` for compress_detailed only when profiling (so a wrapped compressor
    without that keyword keeps working)."""
    return {} if timer is None else {"timer": timer}



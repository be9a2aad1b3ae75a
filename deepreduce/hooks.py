"""DDP communication hook: every gradient bucket through the engine (compress, all-gather,
decode and average).

    import deepreduce as dr
    state = dr.DeepReduceState(process_group=None, compressor="topk:0.01/eliasfano/fp16")
    ddp_model.register_comm_hook(state, dr.deepreduce_hook)

The hook is a thin adapter: it names the bucket's parameters and hands the bucket to
:class:`deepreduce.engine.Engine`, which runs the per-step pipeline (error feedback,
compression, one all-gather, decode and sum in rank order, dense fallback) exactly as
the Horovod and mpi4py front ends do. Every rank sums the same payloads in the same
order, so parameters stay bitwise identical.

Tuning:

- ``compressor``: the density sets the bytes (an ``eliasfano`` index costs about
  ``log2(d/k) + 2`` bits per kept element, ``fp16`` values 16). Error feedback keeps training converging, but slower per step than
  dense, most with Adam: compressing the gradient hands Adam a coordinate's accumulated
  gradient in bursts. If validation loss matters more than keeping your optimizer loop,
  use the compressed-update mode (:mod:`deepreduce.optim`). Compare validation loss at
  your density; ``benchmarks/RESULTS.md`` has measured gaps.
- ``granularity``: ``"tensor"`` (default) selects the top elements of each parameter
  separately, so no layer is starved by another with larger gradients; ``"bucket"``
  runs one top-k over the whole bucket (fewer, larger payloads: less per-call overhead
  with hundreds of small tensors). In the update mode, Horovod and mpi4py front ends,
  which lay out their own buffers with the small tensors last, ``"bucket"`` with a
  ``small_compressor`` runs one top-k over the large tensors and leaves the small ones
  to the small compressor (when that pays in the update mode: :mod:`deepreduce.optim`).
- ``pack_tensors`` (default on): with ``"tensor"``, the parameters at or above
  ``min_numel`` in a bucket share one payload while each keeps its own top-k budget
  (``topk``; ``blocktopk`` where each is a whole number of its blocks): one header and
  one select, encode and decode per bucket instead of one per parameter, wherever
  receivers then decode exactly what per-parameter payloads give (``raw``, ``bf16``,
  ``fp16`` and ``uniform`` values; not ``qsgd``, whose random stream is per payload).
  They are read where they lie in the bucket: DDP alternates weights and biases, and
  the small parameters between them keep their own entries.
- ``start_iter``: dense allreduce for the first steps; a few hundred help accuracy early
  in training, like PowerSGD's ``start_powerSGD_iter``.
- ``min_numel``: buckets smaller than this go dense; inside a bucket, parameters smaller
  than this travel uncompressed (biases, norms).
- ``dense_fallback``: an all-gather moves every rank's payload to every rank, so with
  many ranks or a high density it can move more than an allreduce: then the bucket is
  allreduced (``stats()["dense_fallbacks"]`` counts it).
- DGC's recipe (Lin et al., 2018) for SGD: ``momentum`` (momentum correction and
  momentum-factor masking; use with a momentum-free optimizer), ``density_warmup``
  (the density falls exponentially from dense to the target over that many steps) and
  ``clip_norm`` (local gradient clipping per bucket before compression).
- ``nonfinite``: ``"propagate"`` (default) behaves as allreduce: a NaN/Inf gradient on
  any rank reaches every rank's average (AMP's ``GradScaler`` then skips the step) and
  no residual keeps it; ``"raise"`` stops with :class:`~deepreduce.NonFiniteError`
  naming the rank, bucket and step -- for runs without AMP, where a NaN means a bug.
- Residuals are kept per parameter (also with ``granularity="bucket"``), so DDP's
  rebuilt buckets, another ``bucket_cap_mb`` or a resume in any training loop lose
  nothing.
- ``find_unused_parameters`` / ``static_graph``: a parameter this rank did not use in a
  step has no gradient (``.grad`` None), and where no rank used it DDP discards its
  averaged slot; its residual is held back that step (nothing of it is sent) and goes
  out once the parameter trains again. This needs gradients set to None between steps
  (``zero_grad()``'s default); with ``set_to_none=False`` such a step drains it.
  (``scheme="hierarchical"`` keeps residuals per node shard, not per parameter: there a
  parameter unused on every rank still loses what its shard slice sends.)
- ``named_parameters``: ``model.named_parameters()`` names the residuals after the
  parameters in checkpoints; without it parameters are named by the order the hook
  first sees them, which is the same in every run of the same model.

Letting it choose: ``compressor="auto"`` times the warm-up's dense allreduces and
each candidate spec's encode and decode on the real buckets, then sends each bucket
dense, in fp16 or sparse, whichever is predicted fastest (ties go to the less lossy),
and plans again when the step time drifts. The candidate list is the error budget: see
:mod:`deepreduce.engine.plan`.

Choosing the scheme (``scheme=``):

- ``"allgather"`` (default): every rank sends its own top-k, every rank receives the
  other W - 1 payloads and decodes W. The average carries the union of W index sets,
  and any codec works (Bloom filters, ``qsgd``, ``polyfit``, ...). But what each rank
  receives, and its decode time, grow with W, and from ``W * payload > 2 * bucket``
  on the dense fallback takes over. Pick it for a few ranks.
- ``"shared_index"`` (ScaleCom's cyclic local top-k): per bucket and step one leader,
  ``(step + bucket index) mod W``, selects the indices from its own compensated
  gradient and broadcasts only them; every rank allreduces its own values there (k
  elements in the value codec's dtype: ``raw``, ``fp16`` or ``bf16``). A rank moves
  about one index set plus twice k values whatever W, and decodes one index set, so
  it keeps paying where the all-gather falls back to dense: pick it for many ranks
  (or a high density). The indices follow one rank's gradient per step; the other
  ranks' large entries wait in their residuals for their turn as leader, so with 2
  ranks it learns less per step than the all-gather at about the same bytes
  (``benchmarks/RESULTS.md``, "Shared-index allreduce"): do not pick it there. With
  more ranks compare the schemes at equal bytes: what the shared index saves per rank
  buys it a higher density.
  It costs one more blocking round trip per bucket (the broadcast, before the values
  can be gathered; under torchrun with several processes per node it crosses to each
  node once and is passed on inside it). The leader is chosen per bucket, so a resumed run must rebuild the
  same bucket layout (``deepreduce train`` does, with one settling pass).
- ``"hierarchical"`` (HiTopKComm), for several processes per node on a slow network
  between nodes: each node reduce-scatters the bucket densely over its fast links, so
  each of its L processes compresses 1/L of the bucket and exchanges it only with the
  processes of the same local rank on the other nodes; a dense all-gather inside the
  node rebuilds the bucket. L times fewer bytes on the slow links and L times less
  top-k work per process than ``"allgather"``, for two dense collectives inside the
  node; the bytes per process still grow with the number of nodes (an all-gather among
  them). Needs the default process group (see :mod:`deepreduce.engine.hierarchical`).
- ``"hierarchical_shared_index"``: the same inside the node, and the shared-index
  allreduce between nodes instead of the all-gather, so what a process sends between
  nodes stays about one index set plus twice k values however many nodes there are.
  For many nodes; it carries the shared index's accuracy cost (one leader's indices per
  slot and step) and its codec limits (values ``raw``, ``fp16``, ``bf16``).
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations against
# the real classes.
import logging
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .comm import Transport
from .compressor import Compressor
from .engine import Engine, ErrorFeedback, Segment
from .engine.plan import AutoPlan
from .engine.flat import check_named_tensors
from .errors import ConfigError

logger = logging.getLogger(__name__)


class DeepReduceState:
    """Everything :func:`deepreduce_hook` keeps between calls.

    Args:
        process_group: the group to reduce over (None: the default group).
        compressor: a :class:`~deepreduce.Compressor` or its spec string
            (``"topk:0.01/eliasfano/fp16"``); or ``"auto"`` / an
            :class:`~deepreduce.AutoPlan`: per bucket, dense, fp16 or a sparse spec,
            whichever the measured link and compression cost predict to be fastest
            (:mod:`deepreduce.engine.plan`). All ranks must use the same one: at the
            first hook call the ranks compare their configuration and raise
            :class:`~deepreduce.ConfigError` on every rank if they differ.
        start_iter: steps of plain dense allreduce before compression starts.
        error_feedback: keep what compression left out and add it to the next step.
        min_numel: buckets (and, inside a bucket, parameters) with fewer elements are
            not compressed.
        seed: seed of the private random streams (randomk, Bloom policies, stochastic
            rounding); with a spec string it builds the compressor, with a Compressor
            it must match ``compressor.seed``. Default: the compressor's seed.
        stats_every: log :meth:`stats` through ``logging`` (logger ``deepreduce``)
            every that many steps; 0 disables it.
        dense_fallback: allreduce a bucket whose all-gather would move more bytes.
        momentum: DGC momentum correction (see :mod:`deepreduce.engine.memory`); 0 disables.
        granularity: ``"tensor"`` (top-k per parameter) or ``"bucket"`` (one per bucket).
        pack_tensors: with ``"tensor"``, a bucket's large parameters share one payload,
            each on its own budget (see the tuning notes); False: one payload per parameter.
        scheme: ``"allgather"`` (every rank's payload to every rank),
            ``"shared_index"`` (a rotating leader's indices, one allreduce of the values) or
            ``"hierarchical"`` (dense inside a node, compressed between nodes) or
            ``"hierarchical_shared_index"`` (the same with a shared index between nodes); see
            "Choosing the scheme" in the module docstring.
        density_warmup: steps after ``start_iter`` over which the density ramps
            exponentially from dense to the compressor's ratio; 0: none.
        clip_norm: local gradient clipping before compression (per bucket, to
            ``clip_norm / sqrt(W)``); None: none.
        nonfinite: ``"propagate"`` (as allreduce) or ``"raise"`` on NaN/Inf gradients.
        small_compressor: a spec or Compressor for the parameters below ``min_numel``
            inside a compressed bucket (default None: sent raw); see
            :class:`~deepreduce.engine.Engine`.
        size_exchange: ``"auto"`` (no blocking exchange of payload sizes where every rank
            can compute them) or ``"always"``; see :class:`deepreduce.engine.Engine`.
        named_parameters: ``model.named_parameters()``, to name residuals after parameters.
        node_size: processes per node for ``scheme="hierarchical"`` (default: torchrun's
            ``LOCAL_WORLD_SIZE``); needs the default process group.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        compressor: Compressor | str = "topk:0.01/eliasfano/fp16",
        start_iter: int = 2,
        error_feedback: bool = True,
        min_numel: int = 1024,
        seed: int | None = None,
        stats_every: int = 100,
        dense_fallback: bool = True,
        momentum: float = 0.0,
        granularity: str = "tensor",
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
        density_warmup: int = 0,
        clip_norm: float | None = None,
        nonfinite: str = "propagate",
        small_compressor: Compressor | str | None = None,
        scheme: str = "allgather",
        size_exchange: str = "auto",
        node_size: int | None = None,
        pack_tensors: bool = True,
    ) -> None:
        if isinstance(compressor, str):
            compressor = (AutoPlan(seed=0 if seed is None else seed) if compressor == "auto"
                          else Compressor.from_spec(compressor, seed=0 if seed is None else seed))
        elif not isinstance(compressor, (Compressor, AutoPlan)):
            raise ConfigError(f"compressor must be a Compressor, an AutoPlan, 'auto' or a spec string, got "
                              f"{type(compressor).__name__}")
        else:
            own_seed = compressor.seed if isinstance(compressor, Compressor) else compressor.compressors[0].seed
            if seed is not None and seed != own_seed:
                raise ConfigError(f"seed={seed} conflicts with the compressor's seed={own_seed}; pass it to one of them")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ConfigError(f"start_iter must be a non-negative int, got {start_iter!r}")
        self.process_group = process_group
        self.engine = Engine(
            self._make_transport, compressor, error_feedback=error_feedback, momentum=momentum,
            start_iter=start_iter, min_numel=min_numel, dense_fallback=dense_fallback, granularity=granularity,
            density_warmup=density_warmup, clip_norm=clip_norm, nonfinite=nonfinite, stats_every=stats_every,
            small_compressor=small_compressor,
            scheme=scheme,
            size_exchange=size_exchange,
            node_size=node_size,
            pack_tensors=pack_tensors,
        )
        self._names: dict[int, str] = {}
        self._named = False
        self._unpickled_names = False  # named before pickling: the names must be given again
        if named_parameters is not None:
            self.name_parameters(named_parameters)

    def name_parameters(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Name the residuals after the parameters (``model.named_parameters()``), as the
        constructor's ``named_parameters`` does. Call it before the first step; front ends
        that wrap the model themselves (the Lightning strategy) call it for you."""
        names = {id(param): name for name, param in check_named_tensors(named_parameters)}
        if not names:
            raise ConfigError("named_parameters is empty")
        self._names, self._named, self._unpickled_names = names, True, False

    def _make_transport(self) -> Transport:
        from .comm.torch_dist import TorchTransport

        return TorchTransport(self.process_group)

    # --- pickling ------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Configuration, residuals, step and stats travel; the process group and the
        parameter names do not. A process group belongs to one process (only the default
        group, ``process_group=None``, exists again in the unpickling process), and the
        names are keyed by parameter identity, which pickling does not keep: a state built
        with ``named_parameters`` needs :meth:`name_parameters` again after unpickling."""
        if self.process_group is not None:
            raise TypeError(
                "a DeepReduceState with an explicit process_group cannot be pickled: process groups belong to "
                "one process. Build it with process_group=None (the default group) to pickle it."
            )
        state = self.__dict__.copy()
        state["_names"] = {}
        state["_unpickled_names"] = self._named or self._unpickled_names
        state["_named"] = False
        return state

    # --- the engine's settings, for reading --------------------------------------------

    @property
    def compressor(self) -> Compressor:
        return self.engine.compressor

    @property
    def transport(self):
        """The :class:`~deepreduce.comm.torch_dist.TorchTransport` (made on first use)."""
        return self.engine.transport

    @property
    def memory(self) -> ErrorFeedback:
        return self.engine.memory

    @property
    def step(self) -> int:
        return self.engine.step

    @property
    def start_iter(self) -> int:
        return self.engine.start_iter

    @property
    def min_numel(self) -> int:
        return self.engine.min_numel

    @property
    def dense_fallback(self) -> bool:
        return self.engine.dense_fallback

    @property
    def granularity(self) -> str:
        return self.engine.granularity

    @property
    def scheme(self) -> str:
        return self.engine.scheme

    @property
    def error_feedback(self) -> bool:
        return self.engine.memory.enabled

    @property
    def seed(self) -> int:
        return self.engine.compressor.seed

    def describe(self) -> dict[str, Any]:
        """What every rank must agree on."""
        return self.engine.describe()

    def check_agreement(self) -> None:
        """Compare the configuration across ranks (collective); ConfigError if they differ."""
        self.engine.check_agreement()

    # --- naming the bucket's parameters ---------------------------------------------------

    def segments(self, bucket: dist.GradBucket) -> list[Segment]:
        """The bucket's parameters as named segments of its buffer."""
        segments, offset = [], 0
        for param in bucket.parameters():
            name = self._names.get(id(param))
            if name is None:
                if self._unpickled_names:
                    raise ConfigError("this DeepReduceState was built with named_parameters and then pickled; parameter "
                                      "names do not survive pickling: call state.name_parameters(model.named_parameters()) "
                                      "in this process before training")
                if self._named:
                    raise ConfigError("a bucket holds a parameter missing from named_parameters; pass the DDP model's own parameters")
                name = self._names[id(param)] = f"param{len(self._names)}"
            segments.append(Segment(name, offset, param.numel()))
            offset += param.numel()
        return segments

    # --- bookkeeping -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since the start (or the checkpoint): ``steps``, ``dense_bytes``,
        ``sent_bytes``, ``payload_bytes``, ``ratio``, ``density``, ``bits_per_kept``,
        ``compress_s``, ``exchange_s``, ``decompress_s``, ``dense_fallbacks``,
        ``compressed_buckets``, ``warmup_buckets``, ``small_buckets`` (see
        :mod:`deepreduce.engine.stats`)."""
        return self.engine.stats()

    def state_dict(self) -> dict[str, Any]:
        """Residuals, step counter and stats, for checkpoints (tensors on the CPU).

        Residuals belong to one rank: save one state per rank."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (this rank's). A state saved with another
        compressor spec loads with a warning: its residuals are still gradient that was
        not sent, and go out under the new spec. A residual whose parameter now has
        another size restarts from zero when that parameter is next compensated (logged
        at INFO); one of a name this model lacks is never used. A state missing a part
        is refused before anything loads."""
        self.engine.load_state_dict(state)

    def __repr__(self) -> str:
        return f"DeepReduceState({self.describe()}, step={self.step})"


def deepreduce_hook(state: DeepReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Compressed all-gather of one DDP gradient bucket (see the module docstring).

    Dense allreduce for steps before ``state.start_iter``, for buckets smaller than
    ``state.min_numel``, and for buckets whose all-gather would move more bytes than an
    allreduce (``state.dense_fallback``). Works for fp32, fp16 and bf16 buckets, gloo on
    CPU and NCCL on CUDA."""
    engine = state.engine
    buffer = bucket.buffer()
    if buffer.layout != torch.strided or buffer.dim() != 1:
        names = ", ".join(state._names.get(id(p), f"a parameter of shape {tuple(p.shape)}") for p in bucket.parameters())
        raise ConfigError(f"deepreduce_hook: {names} has a sparse gradient (e.g. nn.Embedding(sparse=True)); "
                          "deepreduce compresses dense gradients: build the layer with sparse=False (top-k then "
                          "sends the rows that changed)")
    segments = state.segments(bucket)
    # A parameter this rank did not use has no gradient (DDP zero-fills its slot). If no rank
    # used it, DDP (find_unused_parameters / static_graph) discards its averaged slot, so
    # it must not carry the residual: held, it waits for a step where the parameter trains.
    engine.memory.hold([seg.name for param, seg in zip(bucket.parameters(), segments) if param.grad is None])
    try:
        future = engine.reduce(buffer, segments, key=bucket.index())
    finally:
        engine.memory.hold(())
    if bucket.is_last():
        engine.end_step()
    return future


def local_gradient_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that communicates nothing: every rank keeps its own gradient (the
    compressed-update mode, :class:`deepreduce.UpdateSync`, exchanges updates instead)."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future

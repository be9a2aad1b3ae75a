"""Compressed-update training: each rank steps its own optimizer on its own gradient, and
every ``local_steps`` steps the ranks exchange and average their compressed *parameter
updates* (as CocktailSGD, DiLoCo, DeMo and SparseLoCo do), over the same engine, codecs
and transports as the gradient hook.

    import deepreduce as dr
    optimizer = dr.LocalAdamW(model.parameters(), lr=3e-4, noise="tracked")   # AdamW as data-parallel training steps it
    sync = dr.UpdateSync(model.named_parameters(),       # about 1 % of dense's bytes per step
                         compressor="blocktopk:0.215,block=128/blocks:block=128/uniform:bits=1,scale=bf16",
                         small_compressor="cyclic:0.125/strided/fp16", keep_unsent=True, unsent_scale=1.5,
                         density_schedule=dr.DensityFollowsLR(lr_at, total_steps, power=0.5))
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.step()                 # every local_steps-th call: exchange, average, apply
    sync.finish()                   # every rank ends with the same parameters

Per exchange, on every rank::

    delta     = params - anchor              (anchor: the parameters all ranks agreed on last)
    averaged  = engine(delta)                error feedback: delta + residual is compressed,
                                             residual keeps what was not sent; decode and sum in
                                             rank order, / W (see deepreduce.engine)
    anchor    = anchor + outer(averaged)     identical on every rank
    params    = anchor

so parameters are bitwise identical on every rank after every exchange, and the
optimizer only ever sees dense local gradients: no error-feedback bursts reach Adam's
second moment (which is why compressing the gradient hurts Adam).

Tuning:

- Optimizer and learning rate: SGD is linear, the average of the ranks' SGD steps is the
  data-parallel step: keep its learning rate. Adam(W) is not: every rank divides by the
  second moment of its own gradient, whose noise is W times that of the averaged
  gradient, so its steps come out shorter where noise dominates (and no single
  learning-rate factor fixes that for every element). Use
  :class:`deepreduce.LocalAdamW` as the inner optimizer with the data-parallel learning
  rate: it estimates the averaged gradient's second moment from the rank's own
  statistics. With plain AdamW, raise the learning rate (about 2x at 2 ranks).
- ``compressor``: its ratio is the density *per local step*; each exchange sends
  ``ratio * local_steps`` of the parameters (capped at 1), so bytes per step stay the
  configured figure whatever ``local_steps`` is.
- Small tensors (below ``min_numel``: biases, norms) travel whole by default; in a small
  model that is as many bytes as the compressed rest. ``small_compressor=
  "cyclic:0.125/strided/fp16"`` sends an eighth of each per exchange (no index bits, the
  rest waits in the residual), about a sixteenth of their bytes, for little accuracy.
  They travel packed, one payload for all of them (one header), while error feedback
  and checkpoints stay per tensor.
- The tensors at or above ``min_numel`` travel in one payload, each on its own top-k
  budget (``pack_tensors``, the default): one select, encode and decode per exchange
  and one header, where ``topk`` or ``blocktopk`` select (for ``blocktopk`` every tensor
  but the last a whole number of its blocks) and the ranks then decode bit for bit what
  per-tensor payloads carry (``raw``, ``bf16``, ``fp16`` and ``uniform`` values; with
  ``uniform`` every tensor keeps at least a block of them). ``granularity="bucket"`` instead runs one top-k over all of them
  (the same bytes and speed now); the loss was not reliably as good: with
  :class:`deepreduce.LocalAdamW` and block top-k it did worse on the LM over ten seeds
  while doing better on the classifier (``benchmarks/RESULTS.md``, "One block top-k
  over all the large tensors"). Compare it with ``"tensor"`` on your task.
- Values: at few bytes per step spend them on elements, not on bits per value:
  ``uniform:bits=1,scale=bf16`` (sign times a bfloat16 mean per block of 128, ~1.125
  bits per value), with ``blocktopk`` + ``blocks`` (whole blocks of 128, a few bits per
  block for the ids) an element costs 1.2-1.4 bits, payload header included, in
  tensors of 16-64 K elements.
- ``local_steps`` (H): more local steps mean fewer, denser exchanges of the same total
  bytes. Small H (1-4) tracks dense training closely; large H drifts, as local SGD does,
  and wants an outer step with momentum.
- ``outer_lr`` / ``outer_momentum`` / ``nesterov``: the outer step is SGD on the averaged
  update taken as a negative gradient (DiLoCo uses lr 0.7, Nesterov momentum 0.9 with
  hundreds of local steps). The default, lr 1 without momentum, applies the average as
  it is; error feedback already carries what compression delayed.
- ``density_schedule``: :class:`DensityFollowsLR` moves a run's bytes towards the steps
  where the learning rate, and with it each update, is large (the same total), or with
  a negative power towards the decay. At power 0.5 its effect on final loss was within
  the seed-to-seed spread, either sign, for SGD and for :class:`deepreduce.LocalAdamW`
  with block top-k, and worse with plain AdamW at twice the learning rate and
  ``local_steps=4``; at -0.5 (LocalAdamW, blocks) level with constant over ten seeds,
  -1 worse (``benchmarks/RESULTS.md``, "Bytes that follow the learning rate"). Runs that
  lost fell behind where the loss falls fastest, a stretch the learning rate does not
  mark. Compare against a constant density on your task. With
  ``LocalAdamW(noise="tracked")``, block top-k and ``unsent_scale=1.5`` the two together
  (power 0.5) were within 1 % of dense on four tasks where each alone missed on some:
  the recommended Adam(W) setting (``benchmarks/RESULTS.md``, "Tracked noise with bytes
  that follow the learning rate").
- ``keep_unsent``: each rank keeps the part of its update not sent yet in its own
  parameters (parameters = agreed anchor + own residual), so its optimizer never works
  on a model that lags its own progress; the ranks' parameters then differ by their
  residuals between exchanges, and :meth:`UpdateSync.finish` averages the residuals
  densely (an allreduce of each parameter) so every rank ends with the same parameters.
  With few bytes per step this learns markedly better (``benchmarks/RESULTS.md``).
- ``unsent_scale`` (with ``keep_unsent``): parameters = anchor + ``unsent_scale`` x own
  residual. Above 1 a rank's parameters run ahead of its own unsent progress, standing
  in for the other ranks' progress that has not arrived yet (their unsent updates point
  mostly the same way while the loss falls); below 1 they fall back towards the lagging
  anchor. The residual itself, and what the final flush sends, do not change. With
  :class:`deepreduce.LocalAdamW` and block top-k use 1.5: it learned better than 1 on
  two LM corpora and on the classifier, while 2 and 0.5 did worse. With plain AdamW it
  helped on two tasks and hurt on a third: compare 1.5 with 1 on yours. With momentum
  SGD keep 1 (1.5 did worse on the LM) (``benchmarks/RESULTS.md``, "Parameters ahead of
  the unsent update").
- ``overlap``: start an exchange and apply its average one round later, so the wire
  time hides behind the next round's compute. Parameters then differ between ranks by
  their own un-averaged progress; :meth:`UpdateSync.finish` makes them identical again,
  :meth:`UpdateSync.consensus` evaluates the agreed model, and a checkpoint
  (:meth:`UpdateSync.state_dict` with the model's) saves each rank's own parameters.
- With ``DistributedDataParallel``: pass ``ddp=`` (or call :func:`register_local_hook`)
  so DDP's backward keeps each rank's own gradient instead of allreducing it. DDP
  still broadcasts rank 0's buffers before every forward (``broadcast_buffers=True``,
  its default), a collective per step that :meth:`UpdateSync.stats` does not count:
  where the buffers are constants (a causal mask), build DDP with
  ``forward_sync_buffers=False`` (``broadcast_buffers=False`` before torch 2.13).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .comm import Transport
from .compressor import Compressor
from .engine import Engine, memory_dtype, plan_groups, reduce_named
from .engine.flat import check_named_tensors, packed_below
from .engine.pipeline import positive_number
from .hooks import local_gradient_hook
from .errors import ConfigError, wait

_STATE_FORMAT = 1


def _is_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_update_settings(*, local_steps: Any, outer_lr: Any, outer_momentum: Any, nesterov: Any, overlap: Any,
                          keep_unsent: Any, unsent_scale: Any, broadcast: Any, error_feedback: Any) -> None:
    """ConfigError for :class:`UpdateSync` settings that are out of range or do not go
    together (also used by the integrations, before any worker starts)."""
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ConfigError(f"local_steps must be a positive int, got {local_steps!r}")
    if not _is_number(outer_lr) or not (math.isfinite(outer_lr) and outer_lr > 0):
        raise ConfigError(f"outer_lr must be > 0 and finite, got {outer_lr!r}")
    if not _is_number(outer_momentum) or not 0.0 <= outer_momentum < 1.0:
        raise ConfigError(f"outer_momentum must be in [0, 1), got {outer_momentum!r}")
    for name, value in (("nesterov", nesterov), ("overlap", overlap), ("keep_unsent", keep_unsent),
                        ("broadcast", broadcast)):
        if not isinstance(value, bool):  # a string such as "no" would count as True
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    if nesterov and outer_momentum == 0:
        raise ConfigError("nesterov needs outer_momentum > 0")
    if keep_unsent and error_feedback is False:
        raise ConfigError("keep_unsent=True needs error_feedback=True: the unsent update a rank keeps is its "
                          "error-feedback residual")
    if keep_unsent and overlap:
        raise ConfigError("keep_unsent and overlap cannot be combined")
    if not _is_number(unsent_scale) or not (math.isfinite(unsent_scale) and unsent_scale > 0):
        raise ConfigError(f"unsent_scale must be a finite number > 0, got {unsent_scale!r}")
    if unsent_scale != 1 and not keep_unsent:
        raise ConfigError(f"unsent_scale={unsent_scale!r} needs keep_unsent=True (it scales the unsent update a rank "
                          "keeps in its parameters)")


class DensityFollowsLR:
    """Density factors that follow the learning rate: ``(lr(t) / mean lr) ** power``,
    normalised to a mean of 1 over steps ``start .. steps - 1``. Passed as
    ``UpdateSync(density_schedule=...)``, it sends the same bytes over the run as a
    constant density (less where a factor would push the density past 1). A positive
    power sends more of them while the learning rate (and with it each update) is large
    and fewer as it decays; a negative one the reverse.

    Args:
        lr_at: the learning rate at an optimizer step (counted from 0), e.g. the
            function that sets the optimizer's rate; read once, here, for every step.
        steps: the run's length in optimizer steps.
        start: the first compressed step (``start_iter * local_steps``); the mean is
            taken from there.
        power: 1: proportional to the rate; 2 leans further towards the early steps;
            -0.5: towards the decay; 0: constant.

    Steps past the end keep the last factor. The object holds plain numbers: it
    pickles, and every rank built from the same schedule computes the same densities.
    """

    def __init__(self, lr_at: Callable[[int], float], steps: int, *, start: int = 0, power: float = 1.0) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or isinstance(start, bool) or not isinstance(start, int) \
                or not 0 <= start < steps:
            raise ConfigError(f"DensityFollowsLR needs integers 0 <= start < steps, got start={start!r}, steps={steps!r}")
        if isinstance(power, bool) or not (isinstance(power, (int, float)) and math.isfinite(power)):
            raise ConfigError(f"power must be a finite number, got {power!r}")
        rates = []
        for step in range(start, steps):
            rate = lr_at(step)
            value = positive_number(rate)
            if value is None:
                raise ConfigError(f"lr_at({step}) returned {rate!r}; the learning rate must be a positive number")
            rates.append(value)
        weights = [rate ** power for rate in rates]
        mean = sum(weights) / len(weights)
        self.start, self.power = start, float(power)
        self.factors = tuple(weight / mean for weight in weights)

    def __call__(self, step: int) -> float:
        return self.factors[min(max(step - self.start, 0), len(self.factors) - 1)]

    def __repr__(self) -> str:
        return (f"DensityFollowsLR(steps {self.start}..{self.start + len(self.factors) - 1}, power {self.power:g}, "
                f"factors {self.factors[0]:.3g} -> {max(self.factors):.3g} -> {self.factors[-1]:.3g})")


class _PerExchange:
    """An optimizer-step schedule read at exchanges (picklable, unlike a closure). The
    exchange under way reads it at the optimizer step it follows (``now``, set by
    :class:`UpdateSync` before each exchange: a mid-run ``finish()`` adds an exchange that
    ends no round); any other exchange ``e`` at ``(e + 1) * local_steps - 1``, the step it
    follows when every exchange ends a round."""

    def __init__(self, schedule: Callable[[int], float], local_steps: int) -> None:
        if not callable(schedule):
            raise ConfigError(f"density_schedule must be a function of the step or None, got {type(schedule).__name__}")
        self.schedule, self.local_steps = schedule, local_steps
        self.now: tuple[int, int] | None = None  # (exchange, the optimizer step it follows)

    def __call__(self, exchange: int) -> float:
        if self.now is not None and self.now[0] == exchange:
            return self.schedule(self.now[1])
        return self.schedule((exchange + 1) * self.local_steps - 1)


def register_local_hook(ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Make a DDP model's backward keep local gradients (no allreduce), for update mode."""
    ddp_model.register_comm_hook(None, local_gradient_hook)


class UpdateSync:
    """Exchanges compressed parameter updates every ``local_steps`` optimizer steps.

    Args:
        named_parameters: ``model.named_parameters()`` (``(name, parameter)`` pairs, each
            tensor once), the same on every rank. Parameters with ``requires_grad=False``
            are broadcast but not exchanged; one that requires grad later makes
            :meth:`step` raise :class:`~deepreduce.ConfigError`: build the UpdateSync
            after unfreezing it.
        compressor: a :class:`~deepreduce.Compressor` or spec; its ratio is the density
            per local step.
        local_steps: optimizer steps between exchanges (H).
        outer_lr, outer_momentum, nesterov: the outer SGD step on the averaged update.
        overlap: apply each exchange's average one round late (wire time hides behind
            compute).
        keep_unsent: keep each rank's unsent update in its own parameters (see above);
            needs ``error_feedback``.
        unsent_scale: with ``keep_unsent``, a rank's parameters are the agreed anchor plus
            this multiple of its unsent update (see above); 1: exactly its own progress.
        process_group: the torch.distributed group (default: the world), unless
            ``transport`` is given (any :class:`~deepreduce.comm.Transport`: Horovod,
            mpi4py).
        broadcast: copy rank 0's parameters to every rank first (so all start alike),
            after comparing the configuration and the parameter list across ranks (a
            mismatch raises :class:`~deepreduce.ConfigError` on every rank); without it
            the comparison comes at the first exchange.
        ddp: a DistributedDataParallel model to switch to local gradients.
        seed: the compressor's seed when ``compressor`` is a spec.
        density_schedule: a function of the optimizer step (counted from 0) giving the
            factor on the density of the exchange after that step, e.g.
            :class:`DensityFollowsLR` (more bytes where the learning rate is high, the
            same bytes over the run). None: the same density every exchange.
        min_numel, error_feedback, dense_fallback, granularity, start_iter, nonfinite,
        stats_every, small_compressor, scheme, pack_tensors: engine options (see
            :class:`deepreduce.DeepReduceState`);
            ``start_iter`` exchanges go dense.

    ``sync.config`` holds the options above except the parameters, group, transport and
    DDP model, as given: plain values that pickle, so
    ``UpdateSync(model.named_parameters(), **config)`` builds the same synchroniser in
    another process (an UpdateSync itself cannot be pickled: it is bound to live
    parameters and a process group).
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        compressor: Compressor | str = "topk:0.01/eliasfano/fp16",
        *,
        local_steps: int = 1,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        nesterov: bool = False,
        overlap: bool = False,
        keep_unsent: bool = False,
        unsent_scale: float = 1.0,
        process_group: dist.ProcessGroup | None = None,
        transport: Transport | None = None,
        broadcast: bool = True,
        ddp: torch.nn.parallel.DistributedDataParallel | None = None,
        seed: int = 0,
        min_numel: int = 1024,
        error_feedback: bool = True,
        dense_fallback: bool = True,
        granularity: str = "tensor",
        start_iter: int = 0,
        nonfinite: str = "propagate",
        stats_every: int = 0,
        small_compressor: Compressor | str | None = None,
        scheme: str = "allgather",
        density_schedule: Callable[[int], float] | None = None,
        pack_tensors: bool = True,
    ) -> None:
        self.config: dict[str, Any] = dict(
            compressor=compressor, local_steps=local_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
            nesterov=nesterov, overlap=overlap, keep_unsent=keep_unsent, unsent_scale=unsent_scale, broadcast=broadcast,
            seed=seed,
            min_numel=min_numel, error_feedback=error_feedback, dense_fallback=dense_fallback,
            granularity=granularity, start_iter=start_iter, nonfinite=nonfinite, stats_every=stats_every,
            small_compressor=small_compressor,
            scheme=scheme, density_schedule=density_schedule, pack_tensors=pack_tensors,
        )
        if isinstance(compressor, str) and compressor == "auto":
            raise ConfigError("compressor='auto' plans the gradient hook's buckets; the update mode needs a compressor "
                              "spec such as 'topk:0.035/eliasfano/uniform:bits=1'")
        if isinstance(compressor, str):
            compressor = Compressor.from_spec(compressor, seed=seed)
        elif not isinstance(compressor, Compressor):
            raise ConfigError(f"compressor must be a Compressor or a spec string, got {type(compressor).__name__}")
        if ddp is not None and not hasattr(ddp, "register_comm_hook"):
            raise ConfigError(f"ddp must be a DistributedDataParallel model (or None), got {type(ddp).__name__}")
        check_update_settings(local_steps=local_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                              nesterov=nesterov, overlap=overlap, keep_unsent=keep_unsent, unsent_scale=unsent_scale,
                              broadcast=broadcast, error_feedback=error_feedback)
        if transport is not None and process_group is not None:
            raise ConfigError("pass either transport or process_group, not both")
        named = check_named_tensors(named_parameters)
        self.named_parameters = [(name, p) for name, p in named if p.requires_grad]
        if not self.named_parameters:
            raise ConfigError("no trainable parameters to synchronise")
        # Frozen parameters are broadcast but never exchanged; step() refuses them once unfrozen.
        self._frozen = [(name, p) for name, p in named if not p.requires_grad]
        self.local_steps = local_steps
        self.ratio = compressor.ratio
        self.outer_lr, self.outer_momentum, self.nesterov = float(outer_lr), float(outer_momentum), bool(nesterov)
        self.overlap = bool(overlap)
        self.keep_unsent = bool(keep_unsent)
        self.unsent_scale = float(unsent_scale)
        if transport is None:
            from .comm.torch_dist import TorchTransport

            transport = TorchTransport(process_group)
        described = [[name, list(p.shape), str(p.dtype)] for name, p in self.named_parameters]
        frozen = [[name, list(p.shape), str(p.dtype)] for name, p in self._frozen]
        self.engine = Engine(
            transport, compressor.with_ratio(min(1.0, compressor.ratio * local_steps)),
            error_feedback=error_feedback, start_iter=start_iter, min_numel=min_numel, dense_fallback=dense_fallback,
            granularity=granularity, nonfinite=nonfinite, stats_every=stats_every,
            small_compressor=small_compressor, scheme=scheme, pack_tensors=pack_tensors,
            density_scale=None if density_schedule is None else _PerExchange(density_schedule, local_steps),
            describe_extra={
                "mode": "update", "local_steps": local_steps, "outer_lr": self.outer_lr,
                "outer_momentum": self.outer_momentum, "nesterov": self.nesterov, "overlap": self.overlap,
                "keep_unsent": self.keep_unsent, "unsent_scale": self.unsent_scale,
                "parameters": described, "frozen": frozen,
            },
        )
        if broadcast:
            # Ranks with other parameters would fail inside the broadcast's collectives with
            # the transport's error (or hang): compare first, so they get a ConfigError
            # naming both sides. The engine does not compare again at its first exchange.
            self.engine.check_agreement()
            self._broadcast_from_rank0()
        if ddp is not None:
            register_local_hook(ddp)
        # Anchors: the agreed parameters, in fp32 for half-precision parameters (their
        # updates would round away in fp16).
        self.anchors = {name: p.detach().to(memory_dtype(p.dtype), copy=True) for name, p in self.named_parameters}
        self._base = {name: a.clone() for name, a in self.anchors.items()} if self.overlap or self.keep_unsent else None
        self.groups = plan_groups(list(self.anchors.items()), small_below=packed_below(self.engine))
        self._outer = None
        if (self.outer_lr, self.outer_momentum) != (1.0, 0.0):
            self._outer_params = [torch.nn.Parameter(a, requires_grad=False) for a in self.anchors.values()]
            self._outer = torch.optim.SGD(self._outer_params, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=self.nesterov)
        self.local_step = 0
        self._pending: tuple[torch.futures.Future | None, dict[str, torch.Tensor]] | None = None
        self._finished = False  # finish() ran and no step() since: another finish() has nothing to do

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "an UpdateSync cannot be pickled: it is bound to this process's parameters and process group. "
            "Pickle its configuration instead (sync.config, a dict of plain values: "
            "dr.UpdateSync(model.named_parameters(), **config) rebuilds it) and keep its progress with "
            "sync.state_dict() / load_state_dict()."
        )

    # --- properties ----------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        return self.engine.transport

    @property
    def compressor(self) -> Compressor:
        """The compressor one exchange uses (density ``ratio * local_steps``)."""
        return self.engine.compressor

    @property
    def exchanges(self) -> int:
        return self.engine.step

    # --- the step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> bool:
        """Call after every ``optimizer.step()``. Returns whether this call exchanged."""
        self._check_frozen()
        self._finished = False
        self.local_step += 1
        if self.local_step % self.local_steps:
            return False
        if self.overlap:
            self._exchange_overlapped()
        else:
            self._exchange()
        return True

    def _deltas(self, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = [name for name, _ in self.named_parameters]
        current = [p.detach().to(base[name].dtype) for name, p in self.named_parameters]
        # One call for all tensors (the per-tensor ops it runs are those of a loop).
        return dict(zip(names, torch._foreach_sub(current, [base[name] for name in names])))

    def _apply(self, averaged: dict[str, torch.Tensor]) -> None:
        """anchor += outer(averaged), identically on every rank."""
        if self._outer is None:
            for name, anchor in self.anchors.items():
                anchor.add_(averaged[name])
            return
        for param, name in zip(self._outer_params, self.anchors):
            param.grad = averaged[name].neg()
        self._outer.step()
        self._outer.zero_grad(set_to_none=True)

    def _set_parameters(self, extra: dict[str, torch.Tensor] | None = None) -> None:
        params = [p for _, p in self.named_parameters]
        values = [self.anchors[name] for name, _ in self.named_parameters]
        if extra is not None:
            values = torch._foreach_add(values, [extra[name] for name, _ in self.named_parameters])
        torch._foreach_copy_(params, values)

    def _starting_exchange(self) -> None:
        if isinstance(self.engine.density_scale, _PerExchange):
            self.engine.density_scale.now = (self.engine.step, self.local_step - 1)

    def _as_set(self) -> dict[str, torch.Tensor]:
        """The anchors as the parameters hold them after :meth:`_set_parameters`: rounded to a
        half-precision parameter's dtype. Updates are measured from there, so the anchors
        keep the fraction of an fp16/bf16 step that the average moved them by."""
        return {name: a if a.dtype == p.dtype else a.to(p.dtype).to(a.dtype)
                for (name, p), a in zip(self.named_parameters, self.anchors.values())}

    def _exchange(self) -> None:
        self._starting_exchange()
        averaged = reduce_named(self.engine, self.groups, self._deltas(self._base if self.keep_unsent else self._as_set()))
        self.engine.end_step()
        self._apply(averaged)
        if not self.keep_unsent:
            self._set_parameters()
            return
        unsent = {name: self._residual(name, p) for name, p in self.named_parameters}
        if self.unsent_scale != 1:  # new tensors: the residuals stay as they are
            unsent = dict(zip(unsent, torch._foreach_mul(list(unsent.values()), self.unsent_scale)))
        self._set_parameters(unsent)
        self._copy_to_base()

    def _copy_to_base(self) -> None:
        torch._foreach_copy_([self._base[name] for name, _ in self.named_parameters],
                             [p.detach() for _, p in self.named_parameters])

    def _residual(self, name: str, param: torch.Tensor) -> torch.Tensor:
        residual = self.engine.memory.residual(name)
        return torch.zeros_like(self.anchors[name]) if residual is None else residual.view_as(param)

    def _exchange_overlapped(self) -> None:
        self._starting_exchange()
        progress = self._deltas(self._base)
        self._apply_pending()
        pending = reduce_named(self.engine, self.groups, progress, wait=False)
        self.engine.end_step()
        self._pending = pending
        self._set_parameters(progress)  # the agreed model plus this rank's own un-averaged progress
        self._copy_to_base()

    def _apply_pending(self) -> None:
        if self._pending is not None:
            averaged = _wait(self._pending)
            self._pending = None
            self._apply(averaged)

    @torch.no_grad()
    def finish(self) -> None:
        """Bring every rank to the same parameters: apply a pending (overlapped) exchange
        and exchange any progress made since. Collective. Training may continue after; a
        second call with no :meth:`step` in between does nothing."""
        self._check_frozen()
        if self._finished:
            return  # another exchange would send residuals (or zeros) and move the parameters again
        if self.keep_unsent:
            self._flush_dense()
        elif not self.overlap:
            if self.local_step % self.local_steps:
                self._exchange()
        else:
            self._finish_overlapped()
        self._finished = True

    def _finish_overlapped(self) -> None:
        """Apply the pending exchange, then exchange the progress since and apply it at once."""
        self._starting_exchange()
        progress = self._deltas(self._base)
        self._apply_pending()
        averaged = reduce_named(self.engine, self.groups, progress)
        self.engine.end_step()
        self._apply(averaged)
        self._set_parameters()
        self._copy_to_base()

    def _check_frozen(self) -> None:
        for name, p in self._frozen:
            if p.requires_grad:
                raise ConfigError(
                    f"parameter {name!r} had requires_grad=False when this UpdateSync was built and requires grad now; "
                    "its updates would never be exchanged. Build the UpdateSync after unfreezing it."
                )

    def _flush_dense(self) -> None:
        """Average every rank's whole unsent update densely (an allreduce of each parameter,
        the model's size in all), so every rank ends with the same parameters and no residual."""
        transport = self.engine.transport
        for name, p in self.named_parameters:
            delta = p.detach().to(self.anchors[name].dtype) - self.anchors[name]
            if self.unsent_scale != 1:  # the parameters hold unsent_scale x the residual: send it whole
                delta.add_(self._residual(name, p), alpha=1 - self.unsent_scale)
            delta.div_(transport.world_size)  # divide first, as the engine does
            transport.allreduce_(delta)
            self.anchors[name].add_(delta)
            self.engine._stats.add(sent_bytes=delta.numel() * delta.element_size())
        self.engine.memory.reset()
        self._set_parameters()
        self._copy_to_base()

    @contextlib.contextmanager
    def consensus(self) -> Iterator[None]:
        """Within this block the parameters are the agreed ones (the anchors), the same
        on every rank: evaluate there. The local parameters come back afterwards."""
        saved = [p.detach().clone() for _, p in self.named_parameters]
        with torch.no_grad():
            self._set_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), value in zip(self.named_parameters, saved):
                    p.copy_(value)

    def _broadcast_from_rank0(self) -> None:
        """Rank 0's parameters everywhere (frozen ones too), as a sum in which the other
        ranks add zeros."""
        transport = self.engine.transport
        for _, p in self.named_parameters + self._frozen:
            mine = p.detach().clone() if transport.rank == 0 else torch.zeros_like(p)
            transport.allreduce_(mine)
            with torch.no_grad():
                p.copy_(mine)

    # --- bookkeeping ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The engine's counters (per exchange) plus ``local_steps`` and ``exchanges``."""
        out = self.engine.stats()
        out.update(local_steps=self.local_steps, exchanges=self.engine.step, optimizer_steps=self.local_step)
        return out

    def _settings(self) -> dict[str, Any]:
        """The options a saved state's meaning depends on (compared on load)."""
        return {
            "local_steps": self.local_steps, "keep_unsent": self.keep_unsent, "unsent_scale": self.unsent_scale,
            "overlap": self.overlap, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
            "nesterov": self.nesterov,
        }

    def state_dict(self) -> dict[str, Any]:
        """Anchors, residuals, counters, outer optimizer state and an averaged update not
        yet applied (overlap): with the model's and the inner optimizer's state dicts, a
        run resumes bit for bit. One per rank (residuals are per rank); the parameters
        are each rank's own (with ``overlap`` or ``keep_unsent`` they differ between
        ranks until :meth:`finish`)."""
        pending = None
        if self._pending is not None:
            averaged = _wait(self._pending)
            pending = {name: t.detach().cpu().clone() for name, t in averaged.items()}
            self._pending = (None, averaged)
        return {
            "format": _STATE_FORMAT,
            "settings": self._settings(),
            "local_step": self.local_step,
            "finished": self._finished,
            "engine": self.engine.state_dict(),
            "anchors": {name: a.detach().cpu().clone() for name, a in self.anchors.items()},
            "base": None if self._base is None else {name: b.detach().cpu().clone() for name, b in self._base.items()},
            "outer": None if self._outer is None else self._outer.state_dict(),
            "pending": pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. A state saved with other settings (``local_steps``,
        ``keep_unsent``, ``unsent_scale``, ``overlap``, the outer step) or for other
        parameters (names, shapes; residuals that do not fit them) is refused, and a refused
        or malformed state leaves the synchroniser as it was. The anchors are fp32 for
        fp32, bf16 and fp16 parameters alike, so a state loads across those dtypes."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not an UpdateSync state dict (format {_STATE_FORMAT})")
        missing = [key for key in ("local_step", "engine", "anchors", "base", "outer") if key not in state]
        if missing:
            raise ValueError(f"UpdateSync state dict: missing {', '.join(missing)}")
        self._check_saved_settings(state)
        anchors = state["anchors"]
        if not isinstance(anchors, dict) or set(anchors) != set(self.anchors):
            names = set(anchors) if isinstance(anchors, dict) else set()
            raise ValueError(f"UpdateSync state: the saved parameters differ from this model's (only saved: "
                             f"{sorted(names - set(self.anchors))[:5]}, only here: {sorted(set(self.anchors) - names)[:5]})")
        if (state["base"] is None) != (self._base is None) or (state["outer"] is None) != (self._outer is None):
            raise ValueError("UpdateSync state was saved with other overlap or outer-step settings")
        pending = state.get("pending")
        if pending is not None and not self.overlap:
            raise ValueError("UpdateSync state holds an overlapped exchange not yet applied; load it with overlap=True")
        local_step = state["local_step"]
        if isinstance(local_step, bool) or not isinstance(local_step, int) or local_step < 0:
            raise ValueError(f"UpdateSync state: local_step must be a non-negative int, got {local_step!r}")
        self._check_saved_tensors("anchors", anchors)
        if self._base is not None:
            self._check_saved_tensors("base", state["base"])
        if pending is not None:
            self._check_saved_tensors("pending", pending)
        self._check_saved_residuals(state["engine"])
        # The engine's and the outer optimizer's own checks come last, undone if either fails.
        engine_before = self.engine.state_dict()
        try:
            self.engine.load_state_dict(state["engine"])
            if self._outer is not None:
                self._outer.load_state_dict(state["outer"])
        except Exception:
            self.engine.load_state_dict(engine_before)
            raise
        self.local_step = local_step
        self._finished = bool(state.get("finished", False))
        with torch.no_grad():
            for name, anchor in self.anchors.items():
                anchor.copy_(anchors[name])
                if self._base is not None:
                    self._base[name].copy_(state["base"][name])
        self._pending = None if pending is None else (None, {name: t.to(self.anchors[name].device) for name, t in pending.items()})

    def _check_saved_settings(self, state: dict[str, Any]) -> None:
        """ConfigError naming each setting whose saved value differs from this synchroniser's."""
        mine = self._settings()
        saved = state.get("settings")
        if saved is None:  # saved before the settings were: the outer step's are in its optimizer's state
            groups = state["outer"].get("param_groups") if isinstance(state["outer"], dict) else None
            group = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
            saved = {key: group[option] for key, option in (("outer_lr", "lr"), ("outer_momentum", "momentum"),
                                                           ("nesterov", "nesterov")) if option in group}
            mine = {key: mine[key] for key in saved}
        if not isinstance(saved, dict):
            raise ValueError(f"UpdateSync state: settings must be a dict, got {type(saved).__name__}")
        differ = [f"{key}: saved {saved.get(key)!r}, here {value!r}" for key, value in mine.items() if saved.get(key) != value]
        if differ:
            raise ConfigError(
                f"UpdateSync state was saved with other local_steps, keep_unsent, unsent_scale, overlap or outer-step "
                f"settings ({'; '.join(differ)}); build the UpdateSync with the saved settings to resume from it"
            )

    def _check_saved_residuals(self, engine_state: Any) -> None:
        """The engine state's residuals: one per parameter at most, each of its parameter's size."""
        memory = engine_state.get("memory") if isinstance(engine_state, dict) else None
        residuals = memory.get("residuals") if isinstance(memory, dict) else None
        if not isinstance(residuals, dict):
            return  # the engine's own check names what is missing
        for name, residual in residuals.items():
            anchor = self.anchors.get(name) if isinstance(name, str) else None
            if anchor is None:
                raise ValueError(f"UpdateSync state: a residual for {name!r}, which is not one of this model's parameters")
            if not isinstance(residual, torch.Tensor) or residual.numel() != anchor.numel():
                size = residual.numel() if isinstance(residual, torch.Tensor) else type(residual).__name__
                raise ValueError(f"UpdateSync state: the residual of {name!r} holds {size} elements; the parameter "
                                 f"has {anchor.numel()}")

    def _check_saved_tensors(self, what: str, saved: Any) -> None:
        """``saved`` (anchors, base or pending) holds a tensor per parameter, shaped as its anchor."""
        if not isinstance(saved, dict) or set(saved) != set(self.anchors):
            raise ValueError(f"UpdateSync state: {what} must hold a tensor for each parameter")
        for name, anchor in self.anchors.items():
            tensor = saved[name]
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"UpdateSync state: {what}[{name!r}] is a {type(tensor).__name__}, not a tensor")
            if tensor.shape != anchor.shape or tensor.dtype != anchor.dtype:
                raise ValueError(f"UpdateSync state: {what}[{name!r}] has shape {tuple(tensor.shape)} and dtype "
                                 f"{tensor.dtype}; this model needs shape {tuple(anchor.shape)} and dtype {anchor.dtype}")


def _wait(pending: Any) -> dict[str, torch.Tensor]:
    """The averaged updates of a launched (or restored) exchange."""
    future, result = pending
    if future is not None:
        for done in wait(future):
            wait(done)  # re-raises a failed bucket's error
    return result

"""``DistributedOptimizer`` for Horovod, with compressed (sparse) gradients.

Horovod's allreduce sums dense tensors and cannot carry sparse payloads, so this
optimizer all-gathers instead, through the same engine as the DDP hook
(:class:`deepreduce.engine.Engine`): after the backward passes the gradients are packed
into one flat buffer per dtype, every rank compresses each parameter's gradient (with
error feedback), one ``hvd.allgather`` moves the framed payloads, and every rank decodes
the W payloads in rank order and averages them, so all ranks step with bitwise-identical
gradients -- the same ones the DDP hook and the mpi4py averager compute.

    import horovod.torch as hvd, deepreduce as dr, deepreduce.horovod
    hvd.init()
    optimizer = deepreduce.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
        compressor=dr.Compressor(ratio=0.01, index="eliasfano", value="fp16"))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

Run with ``horovodrun --gloo -np 2 -H localhost:2 python train.py``. Horovod 0.28.1 needs
a patched build against current torch: ``launch/install-horovod.sh``.

Tuning: compression pays when the network is the bottleneck; an all-gather moves every
payload to all W-1 peers, so at large world sizes or densities above a few percent a
dense allreduce (``hvd.DistributedOptimizer``) is cheaper. ``backward_passes_per_step``
accumulates gradients locally and exchanges once per ``step()``, dividing traffic by that
factor. Tensors below ``min_numel`` elements travel uncompressed. The engine options
(``start_iter``, ``momentum``, ``dense_fallback``, ``granularity``) mean what they mean
for the DDP hook (:class:`deepreduce.DeepReduceState`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator

import torch

from .comm import Transport
from .compressor import Compressor
from .engine import GradientSync

__all__ = ["DistributedOptimizer"]


class _DistributedOptimizer(torch.optim.Optimizer):
    """The methods the wrapper class adds to the wrapped optimizer's class (copied into
    it by :func:`_wrapper_class`); see :func:`DistributedOptimizer`. ``super(type(self),
    self)`` is the wrapped optimizer's class."""

    _deepreduce: GradientSync

    def _deepreduce_setup(
        self,
        exchange: GradientSync,
        backward_passes_per_step: int,
        names: dict[torch.Tensor, str],
    ) -> None:
        self._deepreduce = exchange
        self.backward_passes_per_step = backward_passes_per_step
        self._passes: dict[torch.Tensor, int] = {}
        self._synchronized = False
        self._should_synchronize = True
        self._hook_handles = []
        for param, name in names.items():
            if param.requires_grad:
                self._hook_handles.append(param.register_post_accumulate_grad_hook(self._make_counter(name)))

    def _make_counter(self, name: str):
        def count_pass(param: torch.Tensor) -> None:
            passes = self._passes.get(param, 0) + 1
            if passes > self.backward_passes_per_step:
                raise RuntimeError(
                    f"the gradient of {name!r} was computed {passes} times before step(), more than "
                    f"backward_passes_per_step={self.backward_passes_per_step}; increase backward_passes_per_step "
                    "to accumulate gradients locally, or call step()/zero_grad() in between"
                )
            self._passes[param] = passes

        return count_pass

    def synchronize(self) -> None:
        """Average the gradients across ranks now (``step()`` does this by itself).

        For gradient clipping: ``optimizer.synchronize()``, clip, then
        ``with optimizer.skip_synchronize(): optimizer.step()``."""
        self._deepreduce.synchronize()
        self._passes.clear()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Within this context ``step()`` does not synchronize (it was done explicitly)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Any = None) -> Any:
        if self._should_synchronize:
            if self._synchronized:
                # A second exchange would compress the averaged gradient again and corrupt
                # the error-feedback residuals, so it is skipped.
                warnings.warn(
                    "optimizer.step() called after optimizer.synchronize() without optimizer.skip_synchronize(); "
                    "the gradients were already averaged and are not exchanged again",
                    stacklevel=2,
                )
            else:
                self.synchronize()
        self._synchronized = False
        return super(type(self), self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._passes.clear()
        self._synchronized = False
        super(type(self), self).zero_grad(set_to_none=set_to_none)

    def stats(self) -> dict[str, Any]:
        """The engine's counters: steps, dense_bytes, sent_bytes, ratio, compress_s,
        exchange_s, decompress_s, ... (the same as ``DeepReduceState.stats()``)."""
        return self._deepreduce.stats()

    def deepreduce_state_dict(self) -> dict[str, Any]:
        """Residuals and step counter, for checkpoints (next to ``state_dict()``)."""
        return self._deepreduce.state_dict()

    def load_deepreduce_state_dict(self, state: dict[str, Any]) -> None:
        self._deepreduce.load_state_dict(state)


def _wrapper_class(base: type) -> type:
    """``base`` with :class:`_DistributedOptimizer`'s methods, in Horovod's optimizer module.

    ``hvd.broadcast_optimizer_state`` initialises an optimizer without state by calling
    ``step()`` once on zero gradients, on every rank that lacks state (after a resume, every
    rank but the one that loaded it). For an optimizer whose class is in Horovod's
    optimizer module it calls the wrapped class's ``step()`` (``super(type(opt), opt)``)
    and so exchanges nothing; for any other class the wrapper's own, whose exchange only
    the ranks without state would join: they hang. A class of that module, whose base is
    the wrapped class, makes it skip the exchange as for Horovod's own optimizer."""
    from .comm.horovod import import_horovod

    methods = {name: value for name, value in vars(_DistributedOptimizer).items()
               if name not in ("__dict__", "__weakref__", "__doc__", "__qualname__")}
    methods["__module__"] = import_horovod().DistributedOptimizer.__module__
    return type(base.__name__, (base,), methods)


def _resolve_average(op: Any) -> bool:
    if isinstance(op, str):
        if op.lower() not in ("average", "sum"):
            raise ValueError(f"op must be 'average' or 'sum' (or hvd.Average / hvd.Sum), got {op!r}")
        return op.lower() == "average"
    from .comm.horovod import import_horovod

    hvd = import_horovod()
    if op == hvd.Average:
        return True
    if op == hvd.Sum:
        return False
    raise ValueError(f"op must be hvd.Average or hvd.Sum (Adasum cannot be computed from sparse payloads), got {op!r}")


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    compressor: Compressor | None = None,
    backward_passes_per_step: int = 1,
    op: Any = "average",
    *,
    min_numel: int = 1024,
    error_feedback: bool = True,
    process_set: Any = None,
    transport: Transport | None = None,
    start_iter: int = 0,
    momentum: float = 0.0,
    dense_fallback: bool = True,
    granularity: str = "tensor",
    stats_every: int = 0,
    density_warmup: int = 0,
    clip_norm: float | None = None,
    nonfinite: str = "propagate",
    small_compressor: Compressor | str | None = None,
    scheme: str = "allgather",
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` first averages compressed gradients across ranks.

    Args:
        optimizer: any torch optimizer; the returned object is an instance of its class
            (LR schedulers and ``state_dict()`` work as before) sharing its state. Use the
            returned object from now on.
        named_parameters: ``model.named_parameters()``; names are checked across ranks at
            the first step. Without it, parameters are named by position.
        compressor: a :class:`deepreduce.Compressor` (default: top-1 %, Elias-Fano, fp16).
        backward_passes_per_step: backward passes accumulated locally before each
            ``step()``; more than that raises, as in Horovod.
        op: ``"average"`` / ``hvd.Average`` (default) or ``"sum"`` / ``hvd.Sum``.
        min_numel: tensors with fewer elements travel uncompressed.
        error_feedback: keep what compression dropped and add it to the next gradient.
        start_iter, momentum, dense_fallback, granularity, stats_every, density_warmup,
            clip_norm, nonfinite, small_compressor, scheme: as for :class:`deepreduce.DeepReduceState`,
            except that ``scheme`` is ``"allgather"`` or ``"shared_index"`` (the hierarchical
            schemes need torch.distributed sub-groups).
        process_set: a Horovod process set (default: all ranks).
        transport: another :class:`deepreduce.comm.Transport` instead of Horovod.

    All ranks must use the same compressor, parameters and settings: the first ``step()``
    compares them and raises :class:`deepreduce.ConfigError` on every rank if they differ.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if hasattr(optimizer, "_deepreduce"):
        raise TypeError("optimizer is already a deepreduce DistributedOptimizer")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be a positive int, got {backward_passes_per_step!r}")
    average = _resolve_average(op)
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        named = [(f"param.{i}", p) for i, p in enumerate(optimized)]
    else:
        named = [pair for pair in named_parameters]
        if any(not isinstance(pair, tuple) or len(pair) != 2 for pair in named):
            raise TypeError("named_parameters must yield (name, parameter) pairs, e.g. model.named_parameters()")
        known = {id(p) for _, p in named}
        missing = [i for i, p in enumerate(optimized) if id(p) not in known]
        if missing:
            raise ValueError(
                f"named_parameters lacks {len(missing)} of the optimizer's parameters (positions {missing[:5]}); "
                "pass the model's full named_parameters()"
            )
        # Only what the optimizer updates is exchanged, in named_parameters' order.
        in_optimizer = {id(p) for p in optimized}
        named = [(name, p) for name, p in named if id(p) in in_optimizer]
    if transport is None:
        from .comm.horovod import HorovodTransport

        transport = HorovodTransport(process_set)
    elif process_set is not None:
        raise ValueError("pass either transport or process_set, not both")
    exchange = GradientSync(
        transport, compressor if compressor is not None else Compressor(), named,
        min_numel=min_numel, error_feedback=error_feedback, average=average, start_iter=start_iter,
        momentum=momentum, dense_fallback=dense_fallback, granularity=granularity, stats_every=stats_every,
        density_warmup=density_warmup, clip_norm=clip_norm, nonfinite=nonfinite, small_compressor=small_compressor,
        scheme=scheme,
    )
    cls = _wrapper_class(optimizer.__class__)
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped._deepreduce_setup(exchange, backward_passes_per_step, {p: name for name, p in named})
    return wrapped

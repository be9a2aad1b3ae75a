"""DDP communication hooks for the applications, by name, with their accounting.

:func:`make_hook` returns a hook for a compressor spec (``topk:0.01/eliasfano/fp16``, the
parts listed by ``deepreduce codecs``) or for one of torch's built-in hooks, for
comparison: ``dense`` (allreduce_hook), ``fp16`` (fp16_compress_hook) and ``powersgd``
(powerSGD_hook wrapped by :func:`completed_before_return`). Every hook comes wrapped in
a :class:`CommMeter` that measures the bytes it sent and the time with a bucket's
reduction in flight.

    state, hook, meter, bytes_counter = make_hook("topk:0.01/eliasfano/fp16", seed=0, start_iter=10)
    ddp_model.register_comm_hook(state, hook)
    ...
    sent, seconds_in_flight = meter.take()   # since the last call
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from ..compressor import Compressor
from ..engine.plan import AutoPlan
from ..errors import ConfigError
from ..hooks import DeepReduceState, deepreduce_hook

BUILTIN_HOOKS = ("dense", "fp16", "powersgd")


class CommMeter:
    """Wraps any comm hook to measure, per step, the bytes it sent and the time with a
    reduction in flight (merged intervals from hook call to result)."""

    def __init__(self, bytes_of: Callable[[Any, dist.GradBucket], int] | None) -> None:
        self._bytes_of = bytes_of
        self._lock = threading.Lock()
        self._intervals: list[tuple[float, float]] = []
        self._bytes = 0

    def wrap(self, hook: Callable) -> Callable:
        meter = self

        # No annotations: DDP compares them with the real classes, and this module's
        # annotations are strings (from __future__ import annotations).
        def timed_hook(state, bucket):
            started = time.perf_counter()
            if meter._bytes_of is not None:
                meter.add_bytes(meter._bytes_of(state, bucket))
            future = hook(state, bucket)

            def finished(done: torch.futures.Future) -> torch.Tensor:
                value = done.value()
                with meter._lock:
                    meter._intervals.append((started, time.perf_counter()))
                return value

            return future.then(finished)

        return timed_hook

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def take(self) -> tuple[int, float]:
        """(bytes, seconds in flight) since the last call."""
        with self._lock:
            intervals, self._intervals = sorted(self._intervals), []
            sent, self._bytes = self._bytes, 0
        total, end = 0.0, -math.inf
        for a, b in intervals:
            if b > end:
                total += b - max(a, end)
                end = b
        return sent, total


def completed_before_return(hook: Callable[[Any, dist.GradBucket], torch.futures.Future]) -> Callable[[Any, dist.GradBucket], torch.futures.Future]:
    """Wrap a comm hook so each bucket's future has completed when the hook returns.

    For hooks that issue collectives from ``Future.then`` callbacks (the stock
    ``powerSGD_hook``): with gloo and several buckets those collectives interleave with
    the next bucket's and abort or hang. Waiting serialises them, at the cost of the
    overlap between communication and the rest of the backward pass."""

    def wrapper(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        value = hook(state, bucket).wait()
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(value)
        return done

    wrapper.__name__ = f"completed_{getattr(hook, '__name__', 'hook')}"
    wrapper.__doc__ = hook.__doc__
    return wrapper


def _bucket_bytes(bucket: dist.GradBucket) -> int:
    buffer = bucket.buffer()
    return buffer.numel() * buffer.element_size()


def make_hook(
    compression: str,
    *,
    seed: int = 0,
    start_iter: int = 10,
    min_numel: int = 1024,
    error_feedback: bool = True,
    dense_fallback: bool = True,
    powersgd_rank: int = 4,
    granularity: str = "tensor",
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    momentum: float = 0.0,
    density_warmup: int = 0,
    clip_norm: float | None = None,
    small_compressor: str | None = None,
    scheme: str = "allgather",
    node_size: int | None = None,
    pack_tensors: bool = True,
) -> tuple[Any, Callable, CommMeter, Callable[[], int] | None]:
    """``(state, hook, meter, bytes_counter)`` for a compressor spec, ``"auto"`` (an
    :class:`~deepreduce.AutoPlan` with its default candidates) or a built-in hook name.

    ``state`` and ``hook`` go to ``DistributedDataParallel.register_comm_hook``. ``meter``
    counts bytes and time in flight; for deepreduce compressors ``bytes_counter()`` returns
    the running total of payload bytes sent (more exact than the meter's count, which is
    then 0), for the built-in hooks it is None.

    ``start_iter``: dense steps before compression starts (``powersgd``: at least 2).
    ``min_numel`` and ``dense_fallback`` apply to deepreduce compressors only,
    ``powersgd_rank`` to ``powersgd`` only; ``granularity`` and ``named_parameters`` (which
    name residuals after parameters, so checkpoints do not depend on DDP's bucket layout)
    to deepreduce compressors only. So do DGC's ``momentum`` (momentum correction),
    ``density_warmup`` and ``clip_norm``, ``small_compressor`` (see
    :class:`~deepreduce.DeepReduceState`), ``scheme`` (``"allgather"``, ``"shared_index"`` or
    ``"hierarchical"``), ``node_size`` and ``pack_tensors``; they are passed on only when set. Raises
    :class:`~deepreduce.errors.ConfigError` for an unknown or malformed ``compression``, or
    these options with a built-in hook.
    """
    extra = {key: value for key, value in
             (("momentum", momentum), ("density_warmup", density_warmup), ("clip_norm", clip_norm),
              ("small_compressor", small_compressor))
             if value not in (0, None)}
    if scheme != "allgather":
        extra["scheme"] = scheme
    if node_size is not None:
        extra["node_size"] = node_size
    if not pack_tensors:
        extra["pack_tensors"] = False
    if extra and compression in BUILTIN_HOOKS:
        raise ConfigError(f"{', '.join(extra)} apply to deepreduce compressors, not to {compression!r}")
    if compression == "dense":
        meter = CommMeter(lambda state, bucket: _bucket_bytes(bucket))
        return None, meter.wrap(default_hooks.allreduce_hook), meter, None
    if compression == "fp16":
        meter = CommMeter(lambda state, bucket: bucket.buffer().numel() * 2)
        return None, meter.wrap(default_hooks.fp16_compress_hook), meter, None
    if compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=max(start_iter, 2), use_error_feedback=error_feedback,
            warm_start=True, random_seed=seed,
        )
        meter = CommMeter(None)
        inner = completed_before_return(powerSGD_hook.powerSGD_hook)

        def counted(state, bucket):
            # PowerSGD counts elements only once compressing; before that it allreduces.
            dense = state.iter < state.start_powerSGD_iter
            before = state.total_numel_after_compression
            future = inner(state, bucket)
            after = state.total_numel_after_compression
            meter.add_bytes(_bucket_bytes(bucket) if dense else (after - before) * bucket.buffer().element_size())
            return future

        return state, meter.wrap(counted), meter, None
    try:
        compressor = AutoPlan(seed=seed) if compression == "auto" else Compressor.from_spec(compression, seed=seed)
    except ConfigError as error:
        raise ConfigError(f"{compression!r}: {error} (or use one of {', '.join(BUILTIN_HOOKS)}, or auto)") from error
    state = DeepReduceState(
        None, compressor, start_iter=start_iter, error_feedback=error_feedback,
        min_numel=min_numel, stats_every=0, dense_fallback=dense_fallback, granularity=granularity,
        named_parameters=named_parameters, **extra,
    )
    meter = CommMeter(None)
    return state, meter.wrap(deepreduce_hook), meter, lambda: state.stats()["sent_bytes"]


def hook_state_dict(state: Any) -> Any:
    """What a checkpoint keeps of a hook state from :func:`make_hook`, or of an
    :class:`~deepreduce.UpdateSync` (None for stateless hooks)."""
    if state is None:
        return None
    if hasattr(state, "load_state_dict"):  # DeepReduceState, UpdateSync
        return state.state_dict()
    return state.__getstate__()  # PowerSGDState: everything but the process group


def load_hook_state(state: Any, saved: Any) -> None:
    """Restore what :func:`hook_state_dict` returned into a fresh state of the same kind."""
    if state is None:
        return
    if hasattr(state, "load_state_dict"):
        state.load_state_dict(saved)
    else:
        state.__setstate__(saved)

"""Compressed averaging of a model's gradients after ``backward()``: what the Horovod
optimizer and the mpi4py averager adapt. A thin layer over :class:`Engine`.

A parameter without a gradient on a rank contributes zeros (as DDP does), so after
:meth:`GradientSync.synchronize` every parameter holds the averaged gradient.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..comm import Transport
from ..compressor import Compressor
from .flat import check_named_tensors, packed_below, plan_groups, reduce_named
from .pipeline import Engine


class GradientSync:
    """Averages the gradients of ``named_parameters`` across ranks, compressed.

    Args:
        transport: how messages travel (Horovod, mpi4py, torch.distributed).
        compressor: the same configuration on every rank (checked at the first step).
        named_parameters: ``(name, parameter)`` pairs in the same order on every rank.
        **options: :class:`Engine` options (``start_iter``, ``min_numel``,
            ``error_feedback``, ``momentum``, ``dense_fallback``, ``granularity``,
            ``average``, ``stats_every``).
    """

    def __init__(self, transport: Transport, compressor: Compressor,
                 named_parameters: Iterable[tuple[str, torch.nn.Parameter]], **options: Any) -> None:
        if not isinstance(transport, Transport):
            raise TypeError(f"transport must be a deepreduce.comm.Transport, got {type(transport).__name__}")
        self.named_parameters = list(named_parameters)
        check_named_tensors(self.named_parameters)
        described = [[name, list(p.shape), str(p.dtype)] for name, p in self.named_parameters]
        self.engine = Engine(transport, compressor, describe_extra={"parameters": described}, **options)
        self.groups = plan_groups(self.named_parameters, small_below=packed_below(self.engine))

    @property
    def transport(self) -> Transport:
        return self.engine.transport

    @property
    def compressor(self) -> Compressor:
        return self.engine.compressor

    @property
    def step(self) -> int:
        return self.engine.step

    def synchronize(self) -> None:
        """Replace every gradient with its (compressed) average over all ranks."""
        grads = {}
        for name, param in self.named_parameters:
            if param.grad is not None and param.grad.is_sparse:
                raise TypeError(f"parameter {name!r} has a sparse gradient; pass sparse=False to its embedding")
            grads[name] = param.grad
        averaged = reduce_named(self.engine, self.groups, grads)
        for name, param in self.named_parameters:
            if param.grad is None:
                param.grad = averaged[name].clone()
            else:
                param.grad.copy_(averaged[name])
        self.engine.end_step()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

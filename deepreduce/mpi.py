"""Compressed gradient exchange over mpi4py, for training loops launched by ``mpirun``.

No torch.distributed needed: payloads travel with ``Allgatherv`` on numpy buffers.

    from mpi4py import MPI
    import deepreduce as dr, deepreduce.mpi

    compressor = dr.Compressor(ratio=0.01, index="eliasfano", value="fp16")
    deepreduce.mpi.broadcast_parameters(model.parameters())          # same start everywhere
    averager = deepreduce.mpi.GradientAverager(model.named_parameters(), compressor)
    for x, y in batches:
        optimizer.zero_grad(); loss(model(x), y).backward()
        averager.synchronize()          # grads := compressed average over all ranks
        optimizer.step()

Or one tensor at a time: ``deepreduce.mpi.allreduce_compressed(tensor, compressor, step=s,
bucket=b, memory=deepreduce.mpi.ErrorFeedback())``.

Both run the same engine as the DDP hook and the Horovod optimizer
(:class:`deepreduce.engine.Engine`): the same options, the same payloads and, for the
same per-rank gradients, bitwise the same averages.

Install: ``pip install -c constraints.txt mpi4py mpich`` (``launch/install-mpi.sh``);
run: ``mpiexec -n 2 python train.py`` with the ``mpiexec`` of that MPI (installed next to
the Python interpreter by the ``mpich`` wheel). MPICH's mpiexec runs as root with no
extra flags; Open MPI's needs ``--allow-run-as-root --oversubscribe``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .comm.mpi import MPITransport
from .compressor import Compressor
from .engine import Engine, ErrorFeedback, GradientSync
from .errors import wait

__all__ = ["ErrorFeedback", "GradientAverager", "MPITransport", "allreduce_compressed", "broadcast_parameters"]


def allreduce_compressed(
    tensor: torch.Tensor,
    compressor: Compressor,
    comm: Any = None,
    *,
    step: int | None = None,
    bucket: int | str = 0,
    memory: ErrorFeedback | None = None,
    average: bool = True,
) -> torch.Tensor:
    """Compress ``tensor``, all-gather every rank's payload, decode and sum in rank order.

    Returns a new tensor of ``tensor``'s shape holding the average (``average=True``) or
    the sum of what every rank's payload decodes to; bitwise identical on all ranks.

    Args:
        comm: mpi4py communicator (default ``MPI.COMM_WORLD``).
        step, bucket: seed the compressor's random streams (randomk, Bloom policies,
            stochastic rounding); every rank must pass the same values for a given call.
            Without ``step`` a per-``bucket`` counter is used.
        memory: an :class:`ErrorFeedback`; with it the residual of ``bucket`` is added
            before compression and updated with what the receivers decode.

    Every rank must pass the same compressor and ``average``: each call checks (one small
    all-gather of the configuration) and raises ConfigError on every rank if they differ.
    For a model's gradients at every step, :class:`GradientAverager` checks once.
    """
    transport = comm if isinstance(comm, MPITransport) else MPITransport(comm)
    engine = Engine(
        transport, compressor, memory=memory if memory is not None else ErrorFeedback(enabled=False),
        min_numel=0, dense_fallback=False, average=average,
    )
    engine.step = step if step is not None else compressor.step_of(bucket)
    out = tensor.detach().reshape(-1).clone()
    wait(engine.reduce(out, key=bucket))
    return out.view_as(tensor)


def broadcast_parameters(params: Iterable[torch.Tensor], comm: Any = None, root: int = 0) -> None:
    """Copy ``root``'s values of ``params`` (e.g. ``model.parameters()`` or
    ``model.state_dict().values()``) to every rank, in place."""
    transport = comm if isinstance(comm, MPITransport) else MPITransport(comm)
    for tensor in params:
        host = tensor.detach().to("cpu").contiguous().clone()
        buffer = host.reshape(-1).view(torch.uint8).numpy()
        transport.comm.Bcast(buffer, root=root)
        with torch.no_grad():
            tensor.copy_(host)


class GradientAverager(GradientSync):
    """Averages a model's gradients across MPI ranks with compressed payloads.

    Call :meth:`synchronize` after ``backward()`` and before ``optimizer.step()``;
    :meth:`stats` reports bytes and time, :meth:`state_dict` holds the residuals.

    Args:
        named_parameters: ``model.named_parameters()``, the same on every rank.
        compressor: the same on every rank.
        comm: mpi4py communicator (default ``MPI.COMM_WORLD``).
        min_numel, error_feedback, average, start_iter, momentum, dense_fallback,
        granularity, stats_every, density_warmup, clip_norm, nonfinite, small_compressor, scheme: as for
        :class:`deepreduce.DeepReduceState`, except that ``scheme`` is ``"allgather"`` or
        ``"shared_index"`` (the hierarchical schemes need torch.distributed sub-groups).
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        compressor: Compressor,
        comm: Any = None,
        *,
        min_numel: int = 1024,
        error_feedback: bool = True,
        average: bool = True,
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
    ) -> None:
        transport = comm if isinstance(comm, MPITransport) else MPITransport(comm)
        super().__init__(
            transport, compressor, named_parameters, min_numel=min_numel, error_feedback=error_feedback,
            average=average, start_iter=start_iter, momentum=momentum, dense_fallback=dense_fallback,
            granularity=granularity, stats_every=stats_every, density_warmup=density_warmup, clip_norm=clip_norm, nonfinite=nonfinite,
            small_compressor=small_compressor,
            scheme=scheme,
        )

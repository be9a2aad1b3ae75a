"""Named tensors packed into flat buffers for the engine: the "buckets" of the front
ends that have no DDP reducer to make them (Horovod, mpi4py, the update mode).

Tensors are grouped by (dtype, device), in the order given; each group becomes one flat
buffer whose segments are the tensors, named by their names. With the engine's
default per-tensor granularity a tensor is compressed alike whichever front end and
bucket carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .. import wire
from .pipeline import Engine, Segment


@dataclass
class FlatGroup:
    key: str
    dtype: torch.dtype
    device: torch.device
    names: list[str] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    numel: int = 0


def check_named_tensors(named: Sequence[tuple[str, torch.Tensor]], what: str = "parameter") -> None:
    """Unique names, real tensors, dtypes the wire format carries; TypeError/ValueError otherwise."""
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what} names must be unique, repeated: {', '.join(duplicates)}")
    for name, tensor in named:
        if not isinstance(name, str):
            raise TypeError(f"{what} names must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what} {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in wire.DTYPE_CODES:
            raise TypeError(f"{what} {name!r} has dtype {tensor.dtype}; supported: {sorted(str(d) for d in wire.DTYPE_CODES)}")


def plan_groups(named: Sequence[tuple[str, torch.Tensor]]) -> list[FlatGroup]:
    """One :class:`FlatGroup` per (dtype, device), tensors in the order given."""
    groups: dict[tuple[torch.dtype, torch.device], FlatGroup] = {}
    for name, tensor in named:
        slot = (tensor.dtype, tensor.device)
        group = groups.get(slot)
        if group is None:
            group = groups[slot] = FlatGroup(f"{str(tensor.dtype).replace('torch.', '')}@{tensor.device}", tensor.dtype, tensor.device)
        group.names.append(name)
        group.shapes.append(tensor.shape)
        group.segments.append(Segment(name, group.numel, tensor.numel()))
        group.numel += tensor.numel()
    return list(groups.values())


def reduce_named(engine: Engine, groups: Sequence[FlatGroup], tensors: Mapping[str, torch.Tensor | None], *,
                 wait: bool = True):
    """Average ``tensors`` (``None``: zeros) over ranks through ``engine``, one buffer
    per group; every group's collectives are issued before any is waited for.

    Returns views of the averaged buffers, shaped like the inputs, by name; with
    ``wait=False``, ``(future, views)``: the views hold the averages once the future
    has completed."""
    futures, out = [], {}
    for group in groups:
        parts = []
        for name, shape in zip(group.names, group.shapes):
            tensor = tensors.get(name)
            if tensor is None:
                parts.append(torch.zeros(shape.numel(), dtype=group.dtype, device=group.device))
            elif tensor.shape != shape:
                raise ValueError(f"{name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            else:
                parts.append(tensor.detach().reshape(-1).to(group.dtype))
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=group.dtype, device=group.device)
        futures.append(engine.reduce(flat, group.segments, key=group.key))
        for seg, shape in zip(group.segments, group.shapes):
            out[seg.name] = flat.narrow(0, seg.offset, seg.numel).view(shape)
    if not wait:
        return torch.futures.collect_all(futures), out
    for future in futures:
        future.wait()
    return out

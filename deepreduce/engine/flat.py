"""Named tensors packed into flat buffers for the engine: the "buckets" of the front
ends that have no DDP reducer to make them (Horovod, mpi4py, the update mode).

Tensors are grouped by (dtype, device), in the order given; each group becomes one flat
buffer whose segments are the tensors, named by their names. With the engine's
default per-tensor granularity a tensor is compressed alike whichever front end and
bucket carry it.

With ``small_below`` (the engine's ``min_numel`` when it has a ``small_compressor``),
the tensors below it follow the others and are packed, in order, into one shared segment
(their names as the segment's parts, so error feedback and checkpoints stay per tensor):
one payload, with one header, one encode and one decode, for all the biases and norms
instead of one each. In a small model at 1 % of dense's bytes those headers are a tenth
of the message. The engine sends such a pack the small tensors' way whatever its size
(:meth:`Segment.is_small`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import wire
from .. import errors
from ..errors import ConfigError
from .pipeline import Engine
from .segments import Segment


@dataclass
class FlatGroup:
    key: str
    dtype: torch.dtype
    device: torch.device
    names: list[str] = field(default_factory=list)  # in buffer order
    shapes: list[torch.Size] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    numel: int = 0

    def _add(self, name: str, shape: torch.Size) -> None:
        self.names.append(name)
        self.shapes.append(shape)
        self.offsets.append(self.numel)
        self.numel += shape.numel()


def check_named_tensors(named: Iterable[tuple[str, torch.Tensor]], what: str = "parameter") -> list[tuple[str, torch.Tensor]]:
    """``named`` as a list, checked: (name, tensor) pairs, unique names and each tensor
    once (ConfigError otherwise), string names, tensors of dtypes the wire format
    carries (TypeError otherwise)."""
    if isinstance(named, (torch.Tensor, str)) or not isinstance(named, Iterable):
        raise ConfigError(f"expected ({what} name, tensor) pairs, as model.named_parameters() yields, got "
                          f"{type(named).__name__}")
    named_input, named = named, list(named)
    for position, item in enumerate(named):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            # model.parameters() yields bare tensors, which unpack along their first dimension
            hint = ": pass model.named_parameters(), not model.parameters()" if isinstance(item, torch.Tensor) else \
                ": pass a mapping's .items()" if isinstance(named_input, Mapping) else ""
            raise ConfigError(f"expected ({what} name, tensor) pairs, as model.named_parameters() yields; item {position} "
                              f"is a {type(item).__name__}{hint}")
    for name, tensor in named:
        if not isinstance(name, str):
            raise TypeError(f"{what} names must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what} {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in wire.DTYPE_CODES:
            raise TypeError(f"{what} {name!r} has dtype {tensor.dtype}; supported: {sorted(str(d) for d in wire.DTYPE_CODES)}")
    counts = Counter(name for name, _ in named)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise ConfigError(f"{what} names must be unique, repeated: {', '.join(duplicates)}")
    first_name: dict[int, str] = {}
    for name, tensor in named:
        # A tied tensor listed twice would be exchanged, and updated, twice.
        earlier = first_name.setdefault(id(tensor), name)
        if earlier != name:
            raise ConfigError(f"{what}s {earlier!r} and {name!r} are the same tensor (tied weights); list it once, "
                              "as model.named_parameters() does by default (remove_duplicate=True)")
    return named


def plan_groups(named: Sequence[tuple[str, torch.Tensor]], small_below: int = 0) -> list[FlatGroup]:
    """One :class:`FlatGroup` per (dtype, device), tensors in the order given; with
    ``small_below > 0`` the smaller tensors come last, packed into one shared segment."""
    by_slot: dict[tuple[torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        by_slot.setdefault((tensor.dtype, tensor.device), []).append((name, tensor))
    groups = []
    for (dtype, device), members in by_slot.items():
        group = FlatGroup(f"{str(dtype).replace('torch.', '')}@{device}", dtype, device)
        small = [(name, t) for name, t in members if t.numel() < small_below]
        for name, tensor in members:
            if tensor.numel() >= small_below:
                group.segments.append(Segment(name, group.numel, tensor.numel()))
                group._add(name, tensor.shape)
        start = group.numel
        for name, tensor in small:
            group._add(name, tensor.shape)
        if small:
            group.segments.append(_packed([(name, t.numel()) for name, t in small], start))
        groups.append(group)
    return groups


def packed_below(engine: Engine) -> int:
    """``small_below`` for an engine: its ``min_numel`` when a small compressor sends the
    small tensors (each payload has a header); 0 when they travel raw (no header)."""
    return engine.min_numel if engine.small_compressor is not None else 0


def _packed(parts: list[tuple[str, int]], offset: int) -> Segment:
    """One segment over ``parts`` (a single tensor keeps its own name)."""
    if len(parts) == 1:
        return Segment(parts[0][0], offset, parts[0][1])
    return Segment(tuple(name for name, _ in parts), offset, sum(n for _, n in parts), parts=tuple(parts))


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
        for name, shape, offset in zip(group.names, group.shapes, group.offsets):
            out[name] = flat.narrow(0, offset, shape.numel()).view(shape)
    if not wait:
        return torch.futures.collect_all(futures), out
    for future in futures:
        errors.wait(future)
    return out

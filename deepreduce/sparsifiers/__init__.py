"""Sparsifier registry: which gradient elements travel.

Each sparsifier lives in its own module here and registers a plain function with
:func:`register_sparsifier`; modules in this folder are imported automatically, so
adding a file (and its wire id in :mod:`deepreduce.codecs.ids`) adds a sparsifier, as
for codecs. A sparsifier returns positions; :func:`select_with` turns them into the
canonical :class:`~deepreduce.sparse.SparseGrad` (ascending unique int64 indices with
their values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import rng
from .._bits import strictly_ascending
from ..codecs import import_plugins
from ..codecs.ids import name_of, wire_id
from ..errors import ConfigError
from ..options import Option, format_options, resolve_options
from ..scratch import Scratch
from ..sparse import SparseGrad


@dataclass
class SelectContext:
    """Per-call context handed to a sparsifier: its private random stream and the step
    (the same on every rank)."""

    rng_seed: int = 0
    step: int = 0
    scratch: Scratch | None = None  # reusable full-size work buffers (None: fresh tensors)

    def generator(self, salt: int, device: torch.device) -> torch.Generator:
        return rng.generator(self.rng_seed, salt, device)

    def buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A work tensor of ``numel`` elements (undefined contents), reused across calls when
        the context has a scratch pool."""
        if self.scratch is None:
            return torch.empty(numel, dtype=dtype, device=device)
        return self.scratch.get(name, numel, dtype, device)


SelectFn = Callable[..., torch.Tensor]
CountsFn = Callable[[int, int, Mapping[str, Any]], Sequence[int]]
PartsFn = Callable[[Sequence[int], Mapping[str, Any]], bool]


@dataclass(frozen=True)
class Sparsifier:
    name: str
    sparsifier_id: int
    select: SelectFn
    description: str
    options: Sequence[Option] = ()
    exact_k: bool = True  # returns exactly round(ratio * d) elements (or one of ``counts``)
    counts: CountsFn | None = None  # the element counts it can return for a target k, when not k itself
    # Whether it can select each of several parts of one tensor on its own budget, inside
    # one payload (None: never); ``select_parts`` does all parts at once where given.
    per_part: PartsFn | None = None
    select_parts: SelectFn | None = None

    def selects_parts(self, part_numels: Sequence[int], config: Mapping[str, Any]) -> bool:
        """Whether :func:`select_with` can keep each part's own budget inside one
        payload for parts of these sizes, in order."""
        return self.per_part is not None and self.exact_k and self.per_part(part_numels, config)

    def kept_counts(self, numel: int, k: int, config: Mapping[str, Any]) -> tuple[int, ...]:
        """Every number of elements :meth:`select` can return for ``k`` of ``numel`` (one
        number: exactly that many), for an exact-k sparsifier."""
        if self.counts is None or k in (0, numel):
            return (k,)
        return tuple(sorted(set(int(c) for c in self.counts(numel, k, config))))

    def spec(self, ratio: float, config: Mapping[str, Any]) -> str:
        args = format_options(config, self.options)
        return f"{self.name}:{ratio:g}" + (f",{args}" if args else "")


_SPARSIFIERS: dict[str, Sparsifier] = {}


def register_sparsifier(
    name: str,
    description: str,
    options: Sequence[Option] = (),
    exact_k: bool = True,
    counts: CountsFn | None = None,
    per_part: PartsFn | None = None,
    select_parts: SelectFn | None = None,
) -> Callable[[SelectFn], SelectFn]:
    """Register ``fn(abs_values, k, ctx, **options) -> indices`` under ``name``.

    ``abs_values`` is ``|x|`` as a flat tensor; the function returns int64 positions,
    ascending if it can do so cheaply (they are sorted otherwise). A sparsifier that keeps
    a number of elements other than ``k`` which is still known in advance (whole blocks)
    passes ``counts(numel, k, options)``: the counts it may return, so payload sizes can
    still be computed ahead.

    ``per_part(part_numels, options)`` says whether the sparsifier may select several
    parts of one tensor (the tensors of a bucket) each on its own budget,
    ``round(ratio * part numel)``, with the result sent as one payload: the selection it
    makes per part must be what it would make of the part alone (a deterministic
    sparsifier), and the union of the parts' selections must suit its index codec.
    :func:`select_with` then calls ``fn`` once per part, or
    ``select_parts(abs_values, part_numels, ks, ctx, **options)`` once where given."""

    def decorator(fn: SelectFn) -> SelectFn:
        if name in _SPARSIFIERS:
            raise RuntimeError(f"sparsifier {name!r} registered twice")
        _SPARSIFIERS[name] = Sparsifier(name, wire_id("sparsifier", name), fn, description, tuple(options), exact_k, counts,
                                        per_part, select_parts)
        return fn

    return decorator


_discovered = False


def _discover() -> None:
    """Import every sparsifier in this folder, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import_plugins(__name__)


def sparsifiers() -> list[str]:
    """Names of the registered sparsifiers."""
    _discover()
    return sorted(_SPARSIFIERS)


def get_sparsifier(name: str) -> Sparsifier:
    _discover()
    try:
        return _SPARSIFIERS[name]
    except KeyError:
        raise ConfigError(f"unknown sparsifier {name!r}; registered: {', '.join(sparsifiers())}") from None


def sparsifier_name(sparsifier_id: int) -> str | None:
    """The name behind a sparsifier's wire id, or None."""
    return name_of("sparsifier", sparsifier_id)


def target_k(numel: int, ratio: float) -> int:
    """Elements kept for a density ``ratio``: at least one unless the ratio is 0."""
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0 or numel == 0:
        return 0
    return min(numel, max(1, int(round(ratio * numel))))


def sparsify(
    x: torch.Tensor,
    ratio: float,
    method: str = "topk",
    ctx: SelectContext | None = None,
    **options: Any,
) -> SparseGrad:
    """Select elements of ``x`` (flattened) with the named sparsifier."""
    entry = get_sparsifier(method)
    config = resolve_options(f"sparsifier {method!r}", entry.options, options)
    return select_with(entry, config, x, ratio, ctx or SelectContext())


def select_with(
    entry: Sparsifier, config: Mapping[str, Any], x: torch.Tensor, ratio: float, ctx: SelectContext,
    parts: Sequence[int] | None = None,
) -> SparseGrad:
    """Select from ``x`` (flattened) at density ``ratio``; with ``parts`` (element counts
    that tile ``x``, in order), each part at that density on its own, for a sparsifier
    whose ``selects_parts`` allows it."""
    flat = x.reshape(-1)
    if parts is not None:
        return _select_parts(entry, config, flat, ratio, ctx, list(parts))
    k = target_k(flat.numel(), ratio)
    if k == flat.numel() and entry.exact_k:
        indices = torch.arange(k, device=flat.device)
    elif k == 0 and entry.exact_k:
        indices = torch.empty(0, dtype=torch.int64, device=flat.device)
    else:
        magnitude = torch.abs(flat, out=ctx.buffer("magnitude", flat.numel(), flat.dtype, flat.device))
        indices = _ascending(entry, config, magnitude, k, ctx)
    return SparseGrad(indices, flat.index_select(0, indices), flat.numel())


def _ascending(entry: Sparsifier, config: Mapping[str, Any], magnitude: torch.Tensor, k: int,
               ctx: SelectContext) -> torch.Tensor:
    """The sparsifier's ``k`` positions of ``magnitude``, ascending."""
    indices = entry.select(magnitude, k, ctx, **config)
    return indices if strictly_ascending(indices) else torch.sort(indices).values


def _select_parts(entry: Sparsifier, config: Mapping[str, Any], flat: torch.Tensor, ratio: float, ctx: SelectContext,
                  parts: list[int]) -> SparseGrad:
    if sum(parts) != flat.numel() or any(n < 0 for n in parts):
        raise ValueError(f"parts {parts} do not tile a tensor of {flat.numel()} elements")
    if not entry.selects_parts(parts, config):
        raise ConfigError(f"sparsifier {entry.name!r} cannot select parts of {parts} elements on their own budgets "
                          "in one payload")
    ks = [target_k(n, ratio) for n in parts]
    if ks == parts:
        indices = torch.arange(flat.numel(), device=flat.device)
    elif not any(ks):
        indices = torch.empty(0, dtype=torch.int64, device=flat.device)
    else:
        magnitude = ctx.buffer("magnitude", flat.numel(), flat.dtype, flat.device)
        if entry.select_parts is not None:
            indices = entry.select_parts(torch.abs(flat, out=magnitude), parts, ks, ctx, **config)
        else:
            pieces, offset = [], 0
            for numel, k in zip(parts, ks):
                if k == numel:
                    piece = torch.arange(numel, device=flat.device)
                elif k == 0:
                    piece = torch.empty(0, dtype=torch.int64, device=flat.device)
                else:
                    # Each part's magnitudes just before its selection reads them: still in cache.
                    part = torch.abs(flat.narrow(0, offset, numel), out=magnitude.narrow(0, offset, numel))
                    piece = _ascending(entry, config, part, k, ctx)
                pieces.append(piece + offset)
                offset += numel
            indices = torch.cat(pieces)
    return SparseGrad(indices, flat.index_select(0, indices), flat.numel())


__all__ = [
    "SelectContext",
    "Sparsifier",
    "get_sparsifier",
    "register_sparsifier",
    "select_with",
    "sparsifier_name",
    "sparsifiers",
    "sparsify",
    "target_k",
]

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


@dataclass(frozen=True)
class Sparsifier:
    name: str
    sparsifier_id: int
    select: SelectFn
    description: str
    options: Sequence[Option] = ()
    exact_k: bool = True  # returns exactly round(ratio * d) elements (or one of ``counts``)
    counts: CountsFn | None = None  # the element counts it can return for a target k, when not k itself

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
) -> Callable[[SelectFn], SelectFn]:
    """Register ``fn(abs_values, k, ctx, **options) -> indices`` under ``name``.

    ``abs_values`` is ``|x|`` as a flat tensor; the function returns int64 positions,
    ascending if it can do so cheaply (they are sorted otherwise). A sparsifier that keeps
    a number of elements other than ``k`` which is still known in advance (whole blocks)
    passes ``counts(numel, k, options)``: the counts it may return, so payload sizes can
    still be computed ahead."""

    def decorator(fn: SelectFn) -> SelectFn:
        if name in _SPARSIFIERS:
            raise RuntimeError(f"sparsifier {name!r} registered twice")
        _SPARSIFIERS[name] = Sparsifier(name, wire_id("sparsifier", name), fn, description, tuple(options), exact_k, counts)
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


def _is_ascending(indices: torch.Tensor) -> bool:
    return indices.numel() < 2 or bool((indices[1:] > indices[:-1]).all())


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
    entry: Sparsifier, config: Mapping[str, Any], x: torch.Tensor, ratio: float, ctx: SelectContext
) -> SparseGrad:
    flat = x.reshape(-1)
    k = target_k(flat.numel(), ratio)
    if k == flat.numel() and entry.exact_k:
        indices = torch.arange(k, device=flat.device)
    elif k == 0 and entry.exact_k:
        indices = torch.empty(0, dtype=torch.int64, device=flat.device)
    else:
        magnitude = torch.abs(flat, out=ctx.buffer("magnitude", flat.numel(), flat.dtype, flat.device))
        indices = entry.select(magnitude, k, ctx, **config)
        if not _is_ascending(indices):
            indices = torch.sort(indices).values
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

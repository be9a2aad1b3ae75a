"""``SparseGrad`` and the sparsifiers that produce it.

A sparsifier picks which gradient elements travel. Each one is a plain function
registered by name with :func:`register_sparsifier`; it returns the chosen positions
and :func:`sparsify` turns them into the canonical :class:`SparseGrad` (ascending
unique int64 indices with their values).

On a CPU, exact selection is the largest cost of a compressed step (``torch.topk``
of 25.6 M elements takes ~0.4-0.7 s on 2 cores). All sparsifiers here therefore
estimate a threshold on a small strided sample and then make one or two full passes
(``abs() >= t``, ``count_nonzero``, ``nonzero``), which also keeps the selected
indices in ascending order without a sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from . import rng
from .errors import ConfigError
from .params import Param, format_params, positive, probability, resolve_params


@dataclass
class SparseGrad:
    """A sparse view of a flat gradient: ``values[i]`` belongs at ``indices[i]``.

    ``indices`` are int64, strictly ascending, unique and in ``[0, numel)``."""

    indices: torch.Tensor
    values: torch.Tensor
    numel: int

    @property
    def k(self) -> int:
        return self.indices.numel()

    @property
    def density(self) -> float:
        return self.k / self.numel if self.numel else 0.0

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The flat dense tensor with zeros everywhere else."""
        dense = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        dense[self.indices] = self.values.to(dense.dtype)
        return dense

    def add_to(self, dense: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``dense[indices] += alpha * values`` in place; returns ``dense``."""
        values = self.values.to(dense.dtype)
        dense.index_add_(0, self.indices, values, alpha=alpha)
        return dense


@dataclass
class SelectContext:
    """Per-call context handed to a sparsifier: its private random stream."""

    rng_seed: int = 0

    def generator(self, salt: int, device: torch.device) -> torch.Generator:
        return rng.generator(self.rng_seed, salt, device)


SelectFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Sparsifier:
    name: str
    sparsifier_id: int
    select: SelectFn
    description: str
    params: Sequence[Param] = ()
    exact_k: bool = True  # returns exactly round(ratio * d) elements

    def spec(self, ratio: float, config: Mapping[str, Any]) -> str:
        args = format_params(config, self.params)
        return f"{self.name}:{ratio:g}" + (f",{args}" if args else "")


_SPARSIFIERS: dict[str, Sparsifier] = {}
_SPARSIFIER_IDS: dict[int, Sparsifier] = {}


def register_sparsifier(
    name: str,
    sparsifier_id: int,
    description: str,
    params: Sequence[Param] = (),
    exact_k: bool = True,
) -> Callable[[SelectFn], SelectFn]:
    """Register ``fn(abs_values, k, ctx, **params) -> indices`` under ``name``.

    ``abs_values`` is ``|x|`` as a flat tensor; the function returns int64 positions,
    ascending if it can do so cheaply (they are sorted otherwise)."""

    def decorator(fn: SelectFn) -> SelectFn:
        if name in _SPARSIFIERS or sparsifier_id in _SPARSIFIER_IDS:
            raise RuntimeError(f"sparsifier {name!r} (id {sparsifier_id}) registered twice")
        entry = Sparsifier(name, sparsifier_id, fn, description, tuple(params), exact_k)
        _SPARSIFIERS[name] = entry
        _SPARSIFIER_IDS[sparsifier_id] = entry
        return fn

    return decorator


def sparsifiers() -> list[str]:
    """Names of the registered sparsifiers."""
    return sorted(_SPARSIFIERS)


def get_sparsifier(name: str) -> Sparsifier:
    try:
        return _SPARSIFIERS[name]
    except KeyError:
        raise ConfigError(f"unknown sparsifier {name!r}; registered: {', '.join(sparsifiers())}") from None


def sparsifier_name(sparsifier_id: int) -> str | None:
    entry = _SPARSIFIER_IDS.get(sparsifier_id)
    return entry.name if entry else None


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
    **params: Any,
) -> SparseGrad:
    """Select elements of ``x`` (flattened) with the named sparsifier."""
    entry = get_sparsifier(method)
    config = resolve_params(f"sparsifier {method!r}", entry.params, params)
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
        indices = entry.select(flat.abs(), k, ctx, **config)
        if not _is_ascending(indices):
            indices = torch.sort(indices).values
    return SparseGrad(indices, flat[indices], flat.numel())


# --- threshold search helpers ---------------------------------------------------------

_SAMPLE_SIZE = 1 << 17  # elements in the strided sample that estimates a threshold
_EXACT_BELOW = 1 << 18  # below this size torch.topk is as fast as anything else


def _sample(magnitude: torch.Tensor, size: int = _SAMPLE_SIZE) -> tuple[torch.Tensor, float]:
    """A strided sample of about ``size`` elements and the scale (elements per sample)."""
    stride = max(1, magnitude.numel() // size)
    sample = magnitude[::stride]
    return sample, magnitude.numel() / sample.numel()


def _sample_threshold(sample: torch.Tensor, scale: float, count: float) -> torch.Tensor:
    """Threshold above which about ``count`` elements of the full tensor are expected."""
    kth = min(sample.numel(), max(1, int(math.ceil(count / scale))))
    return torch.topk(sample, kth, sorted=False).values.min()


def _count_at_least(magnitude: torch.Tensor, threshold: torch.Tensor) -> int:
    # count_nonzero on the comparison is ~8x faster than (.. >= t).sum() on CPU.
    return int(torch.count_nonzero(magnitude >= threshold))


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).reshape(-1)


def _keep_top(candidates: torch.Tensor, magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest of ``magnitude[candidates]``, returned in ascending index order."""
    chosen = torch.topk(magnitude[candidates], k, sorted=False).indices
    keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    keep[chosen] = True
    return candidates[keep]


# --- the sparsifiers -----------------------------------------------------------------


@register_sparsifier("topk", 1, "exact top-k by magnitude (sampled threshold, then topk of the candidates)")
def topk(magnitude: torch.Tensor, k: int, ctx: SelectContext) -> torch.Tensor:
    d = magnitude.numel()
    if d <= _EXACT_BELOW or k > d // 4:
        return torch.topk(magnitude, k, sorted=False).indices
    sample, scale = _sample(magnitude)
    # Aim ~10 % above k so one pass over the data almost always yields enough candidates.
    want = 1.1 * k + 4 * math.sqrt(k) * scale
    for _ in range(3):
        threshold = _sample_threshold(sample, scale, want)
        count = _count_at_least(magnitude, threshold)
        if k <= count <= 4 * k + 1024:
            return _keep_top(_nonzero(magnitude >= threshold), magnitude, k)
        want = want * 2 if count < k else want / 2
    # Pathological data (ties, NaNs, adversarial layouts): the reference algorithm.
    return torch.topk(magnitude, k, sorted=False).indices


@register_sparsifier(
    "threshold",
    2,
    "every element with |g| >= t (k varies with the data)",
    params=(Param("t", float, None, "magnitude threshold", check=lambda v: v is not None and v >= 0, check_text="must be >= 0"),),
    exact_k=False,
)
def threshold(magnitude: torch.Tensor, k: int, ctx: SelectContext, t: float | None) -> torch.Tensor:
    if t is None:
        raise ConfigError("sparsifier 'threshold' needs the parameter t (e.g. 'threshold:t=1e-3')")
    return _nonzero(magnitude >= t)


@register_sparsifier("randomk", 3, "k uniformly random positions from the private (seed, step, bucket) stream")
def randomk(magnitude: torch.Tensor, k: int, ctx: SelectContext) -> torch.Tensor:
    d = magnitude.numel()
    gen = ctx.generator(salt=0x52414E44, device=magnitude.device)
    if 2 * k > d:
        return torch.randperm(d, generator=gen, device=magnitude.device)[:k]
    # Draw with replacement and deduplicate: the distinct set of a fixed size is a
    # uniform subset, so a uniform subset of it is uniform too. No O(d) permutation.
    chosen = torch.empty(0, dtype=torch.int64, device=magnitude.device)
    while chosen.numel() < k:
        extra = int(1.2 * (k - chosen.numel())) + 16
        draw = torch.randint(0, d, (extra,), generator=gen, device=magnitude.device)
        chosen = torch.unique(torch.cat([chosen, draw]))
    order = torch.randperm(chosen.numel(), generator=gen, device=magnitude.device)[:k]
    return chosen[order]


@register_sparsifier(
    "mstopk",
    4,
    "MSTopK: bracket the k-th magnitude by threshold bisection, no sort; exactly k elements",
    params=(
        Param("rounds", int, 8, "full-tensor bisection rounds at most (after the sampled bracket)", check=positive, check_text="must be > 0"),
        Param("band", float, 0.01, "stop bisecting when the bracket holds fewer than band*k extra elements", check=probability, check_text="must be in (0, 1)"),
    ),
)
def mstopk(magnitude: torch.Tensor, k: int, ctx: SelectContext, rounds: int, band: float) -> torch.Tensor:
    """Keep everything above the upper threshold of a bracket ``[lo, hi)`` around the k-th
    magnitude and fill up to exactly k from the band between them, in index order.

    The bracket starts from a strided sample (the paper starts from mean/max of the full
    tensor; on a CPU each full pass costs as much as ~1/10 of a sort), then is narrowed by
    bisection with full ``count_nonzero`` passes until the band is thin."""
    sample, scale = _sample(magnitude)
    slack = 3 * math.sqrt(k) * scale + 0.02 * k
    hi = _sample_threshold(sample, scale, max(1.0, k - slack))
    n_hi = _count_at_least(magnitude, hi)
    if n_hi > k:  # the sample missed: fall back to the paper's upper end, the maximum
        hi = magnitude.max()
        n_hi = _count_at_least(magnitude, hi)
    lo = _sample_threshold(sample, scale, k + slack)
    n_lo = _count_at_least(magnitude, lo)
    if n_lo < k:  # ... and to zero, which every element passes
        lo, n_lo = torch.zeros_like(hi), magnitude.numel()
    for _ in range(rounds):
        if n_lo - n_hi <= band * k or n_hi == k:
            break
        mid = (lo + hi) / 2
        n_mid = _count_at_least(magnitude, mid)
        if n_mid >= k:
            lo, n_lo = mid, n_mid
        else:
            hi, n_hi = mid, n_mid
    if n_hi > k:  # only with ties at the maximum: fall back to an exact choice among them
        return _keep_top(_nonzero(magnitude >= hi), magnitude, k)
    candidates = _nonzero(magnitude >= lo)
    above = magnitude[candidates] >= hi
    in_band = ~above
    fill = in_band & (torch.cumsum(in_band, 0) <= k - n_hi)
    return candidates[above | fill]


@register_sparsifier(
    "dgc",
    5,
    "DGC: threshold from a ~1 % sample, corrected until the count is within a tolerance of k",
    params=(
        Param("sample", float, 0.01, "fraction of elements sampled", check=probability, check_text="must be in (0, 1)"),
        Param("tolerance", float, 0.1, "accepted relative deviation of the count from k", check=probability, check_text="must be in (0, 1)"),
        Param("rounds", int, 3, "correction rounds at most", check=lambda v: v >= 0, check_text="must be >= 0"),
    ),
    exact_k=False,
)
def dgc(magnitude: torch.Tensor, k: int, ctx: SelectContext, sample: float, tolerance: float, rounds: int) -> torch.Tensor:
    d = magnitude.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=magnitude.device)
    picked, scale = _sample(magnitude, max(1, int(d * sample)))
    want = float(k)
    threshold_ = _sample_threshold(picked, scale, want)
    count = _count_at_least(magnitude, threshold_)
    for _ in range(rounds):
        if abs(count - k) <= tolerance * k:
            break
        want = max(1.0, want * k / max(count, 1))
        threshold_ = _sample_threshold(picked, scale, want)
        count = _count_at_least(magnitude, threshold_)
    return _nonzero(magnitude >= threshold_)

"""``threshold``: every element with ``|g| >= t``; k varies with the data."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..options import Option
from .._bits import true_positions
from . import SelectContext, register_sparsifier
from ._search import at_least


@register_sparsifier(
    "threshold",
    "every element with |g| >= t (k varies with the data)",
    options=(Option("t", float, None, "magnitude threshold", check=lambda v: v is not None and v >= 0, check_text="must be >= 0"),),
    exact_k=False,
)
def threshold(magnitude: torch.Tensor, k: int, ctx: SelectContext, t: float | None) -> torch.Tensor:
    if t is None:
        raise ConfigError("sparsifier 'threshold' needs the parameter t (e.g. 'threshold:t=1e-3')")
    return true_positions(at_least(magnitude, torch.tensor(t, dtype=magnitude.dtype)))

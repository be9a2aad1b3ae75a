"""``dexp`` value codec (DeepReduce "Fit-DExp"): a double exponential through the sorted values.

The values are sorted and split by sign (see ``codecs._sorted_curves``); each sign
part's magnitudes, sorted ascending over ``t`` in ``[0, 1]``, are fitted with
``y = a*e^(b*t) + c*e^(d*t)`` by the integral-equation method (J. Jacquelin,
"Regressions et equations integrales"): ``y`` then satisfies
``y = -b*d * SS + (b+d) * S + C*t + D`` with ``S``, ``SS`` its first and second
cumulative integrals (trapezoid rule), so a linear least-squares problem in four
unknowns gives ``b + d`` and ``b*d`` (hence the exponents, as the roots of a
quadratic), and a second one in two unknowns gives ``a`` and ``c``. No iterations,
no starting guess. When the quadratic has no real roots the fit falls back to
``a*e^(b*t) + c``.

By default each sign part is cut into segments as ``polyfit`` cuts it (short ones
at the steep head) and every segment gets its own curve: top-k magnitudes have a
heavy head that one double exponential over the whole range misses
(``segments=single`` has several times the relative error of ``segments=head`` on real
gradients).

Cost: 4 numbers per segment plus the ``ceil(log2 k)``-bit permutation. ``polyfit``
(degree 5) is somewhat more accurate at the same size.
"""

from __future__ import annotations

import torch

from ...errors import DecodeError
from .. import register_value_codec
from ...options import Option
from .._sorted_curves import SortedCurveCodec, head_segments
from .polyfit import lstsq

MAX_EXPONENT = 700.0  # e^700 is still finite in float64; t is in [0, 1]
_MIN_POINTS = 5


def cumulative_integral(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Trapezoid-rule integral of ``y`` from ``t[0]`` to each ``t[i]``."""
    steps = 0.5 * (y[1:] + y[:-1]) * (t[1:] - t[:-1])
    return torch.cat([y.new_zeros(1), torch.cumsum(steps, 0)])


def fit_double_exponential(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[a, b, c, d]`` of ``a*e^(b*t) + c*e^(d*t)`` fitted to ``y(t)`` (float64)."""
    if y.numel() < _MIN_POINTS:
        return torch.stack([y.mean(), y.new_zeros(()), y.new_zeros(()), y.new_zeros(())])
    first = cumulative_integral(y, t)
    second = cumulative_integral(first, t)
    design = torch.stack([second, first, t, torch.ones_like(t)], dim=1)
    minus_product, total, _, _ = lstsq(design, y).tolist()
    discriminant = total * total + 4.0 * minus_product
    if discriminant > 0:
        root = discriminant**0.5
        b, d = (total + root) / 2.0, (total - root) / 2.0
    else:
        b, d = total, 0.0
    b = min(max(b, -MAX_EXPONENT), MAX_EXPONENT)
    d = min(max(d, -MAX_EXPONENT), MAX_EXPONENT)
    basis = torch.stack([torch.exp(b * t), torch.exp(d * t)], dim=1)
    a, c = lstsq(basis, y).tolist()
    return torch.tensor([a, b, c, d], dtype=torch.float64, device=y.device)


@register_value_codec
class DoubleExponentialValueCodec(SortedCurveCodec):
    name = "dexp"
    description = "double-exponential fits of the sorted values per sign + bit-packed permutation"
    options = (
        Option("segments", str, "head", "head: one curve per segment as polyfit cuts them; single: one curve per sign", choices=("head", "single")),
    )

    def segment_sizes(self, n: int) -> list[int]:
        return head_segments(n) if self.config["segments"] == "head" else [n]

    @classmethod
    def coefficient_count(cls, arg: int) -> int:
        if arg:
            raise DecodeError(f"dexp: unexpected coefficient argument {arg}")
        return 4

    def fit_segment(self, magnitude: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Magnitudes arrive descending over x; the model is written for ascending t = 1 - x.
        return fit_double_exponential(magnitude.flip(0), x)

    @classmethod
    def check_coefficients(cls, coefficients: torch.Tensor) -> None:
        if bool((coefficients[:, [1, 3]].abs() > MAX_EXPONENT).any()):
            raise DecodeError(f"dexp: exponent beyond +-{MAX_EXPONENT}")

    @classmethod
    def evaluate(cls, coefficients: torch.Tensor, segment: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = coefficients[segment].unbind(1)
        t = 1.0 - x
        return a * torch.exp(b * t) + c * torch.exp(d * t)

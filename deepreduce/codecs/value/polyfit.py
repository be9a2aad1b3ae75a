"""``polyfit`` value codec (DeepReduce "Fit-Poly"): piecewise polynomials of the sorted values.

The values are sorted and split by sign (see ``codecs._sorted_curves``); each sign
part's descending magnitudes are cut into segments -- short ones at the steep head,
of about ``n/1000, n/300, n/100, n/30, n/10, n/5`` values (those above 30), then
the rest as one tail segment -- and each segment gets a least-squares polynomial of
degree ``degree`` over ``x`` in ``[0, 1]``, solved by ``torch.linalg.lstsq`` (an SVD
solver on CPU; the normal equations of a Vandermonde matrix are ill-conditioned).

Cost: ``ceil(log2 k)`` bits per value for the permutation (18 at k = 256 K) plus
~100 bytes per segment. Relative error on real top-k gradients is a few percent;
it is systematic (not unbiased), so keep error feedback on.

Tuning: ``degree`` 3-7; higher degrees barely help on smooth sorted magnitudes.
"""

from __future__ import annotations

import torch

from ...errors import DecodeError
from ...options import Option
from .. import register_value_codec
from .._sorted_curves import SortedCurveCodec, head_segments

MAX_DEGREE = 10


def lstsq(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares solution of ``design @ w ~ target``.

    Columns are scaled to unit norm first (columns of very different size, such as
    ``e^(60 t)`` next to ``e^t``, would otherwise fall under the solver's rank cutoff);
    the SVD-based solver copes with the remaining rank deficiency on CPU."""
    scale = torch.linalg.vector_norm(design, dim=0).clamp(min=torch.finfo(torch.float64).tiny)
    driver = "gelsd" if design.device.type == "cpu" else None
    return torch.linalg.lstsq(design / scale, target.unsqueeze(1), driver=driver).solution.reshape(-1) / scale


@register_value_codec
class PolyFitValueCodec(SortedCurveCodec):
    name = "polyfit"
    description = "piecewise polynomial fit of the sorted values + bit-packed permutation (~log2 k bits/value)"
    options = (Option("degree", int, 5, f"polynomial degree per segment (0..{MAX_DEGREE})", check=lambda v: 0 <= v <= MAX_DEGREE, check_text=f"must be in [0, {MAX_DEGREE}]"),)

    def coefficient_arg(self) -> int:
        return self.config["degree"]

    @classmethod
    def coefficient_count(cls, arg: int) -> int:
        if arg > MAX_DEGREE:
            raise DecodeError(f"polyfit: degree {arg} above {MAX_DEGREE}")
        return arg + 1

    def segment_sizes(self, n: int) -> list[int]:
        return head_segments(n)

    def fit_segment(self, magnitude: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        degree = self.config["degree"]
        usable = min(degree, magnitude.numel() - 1)  # never more coefficients than points
        design = x.unsqueeze(1) ** torch.arange(usable + 1, dtype=torch.float64, device=x.device)
        coefficients = torch.zeros(degree + 1, dtype=torch.float64, device=x.device)
        coefficients[: usable + 1] = lstsq(design, magnitude)
        return coefficients

    @classmethod
    def evaluate(cls, coefficients: torch.Tensor, segment: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        per_element = coefficients[segment]  # (n, degree + 1)
        result = per_element[:, -1].clone()
        for power in range(coefficients.shape[1] - 2, -1, -1):  # Horner
            result.mul_(x).add_(per_element[:, power])
        return result

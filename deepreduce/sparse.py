"""``SparseGrad``: the canonical sparse form of a flat gradient that every sparsifier
produces and every decoder returns (sparsifiers live in :mod:`deepreduce.sparsifiers`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

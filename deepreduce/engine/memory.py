"""Error feedback: what compression leaves out of one step is added to the next.

Every key (a parameter's name, or a bucket's index) keeps a *residual*. Before compression the gradient is *compensated*
(``g + residual``); after it the residual becomes ``compensated - decoded`` where
``decoded`` is exactly what the receivers will reconstruct (``Compressed.sent``). So
nothing is lost, only delayed: elements top-k skipped, values a lossy codec rounded,
false positives a Bloom filter added, all re-enter a later step.

Optional DGC momentum correction (``momentum > 0``) accumulates a velocity
``u = m*u + g`` and compensates with it instead of ``g``; the velocity of the elements
that were sent is cleared ("momentum factor masking"). Use it with a plain SGD
optimizer (no optimizer momentum), as in Deep Gradient Compression.

Residuals of half-precision gradients are kept in fp32: summing many small fp16
remainders in fp16 would round them away, which is the very error feedback corrects.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable

import torch

from ..sparse import SparseGrad

logger = logging.getLogger(__name__)


def memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype residuals of a ``dtype`` gradient are kept in (fp32 for fp16/bf16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class ErrorFeedback:
    """Residual memory per key (a parameter's name, or a bucket's index).

    Args:
        enabled: with ``False`` :meth:`compensate` returns the gradient (as the memory
            dtype) and :meth:`update` keeps nothing: plain lossy compression.
        momentum: DGC momentum correction factor in ``[0, 1)``; 0 disables it.

    A residual whose size or dtype no longer matches (DDP rebuilt a bucket kept by index)
    is dropped and starts again from zero.
    """

    def __init__(self, enabled: bool = True, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.enabled = bool(enabled)
        self.momentum = float(momentum)
        self.residuals: dict[Hashable, torch.Tensor] = {}
        self.velocities: dict[Hashable, torch.Tensor] = {}

    def _stored(self, table: dict[Hashable, torch.Tensor], key: Hashable, numel: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | None:
        stored = table.get(key)
        if stored is None:
            return None
        if stored.numel() != numel or stored.dtype != dtype:
            logger.info("error feedback: %s changed from %d %s to %d %s elements; its memory restarts from zero",
                        key, stored.numel(), stored.dtype, numel, dtype)
            del table[key]
            return None
        if stored.device != device:  # e.g. loaded from a CPU checkpoint
            stored = table[key] = stored.to(device)
        return stored

    def compensate(self, key: Hashable, grad: torch.Tensor) -> torch.Tensor:
        """``grad + residual`` (or ``velocity + residual`` with momentum), flat, in the
        memory dtype; ``grad`` itself is not modified.

        The sum is made in place in the residual's storage (one pass, no new buffer of
        the bucket's size), so the residual is *consumed*: call :meth:`update` or
        :meth:`update_dense` with the returned tensor before the next compensate."""
        flat = grad.detach().reshape(-1)
        dtype = memory_dtype(flat.dtype)
        if not self.enabled:
            return flat.to(dtype, copy=True)
        if self.momentum:
            velocity = self._stored(self.velocities, key, flat.numel(), dtype, flat.device)
            if velocity is None:
                velocity = self.velocities[key] = flat.to(dtype, copy=True)
            else:
                velocity.mul_(self.momentum).add_(flat)
            flat = velocity
        residual = self._stored(self.residuals, key, flat.numel(), dtype, flat.device)
        if residual is None:
            return flat.to(dtype, copy=True)
        del self.residuals[key]  # consumed; update() stores the new one
        return residual.add_(flat)

    def update(self, key: Hashable, compensated: torch.Tensor, sent: SparseGrad) -> None:
        """Residual := ``compensated - sent`` (``sent`` as the receivers decode it).

        Takes ownership of ``compensated`` (it becomes the residual, updated in place)."""
        if not self.enabled:
            return
        if sent.numel != compensated.numel():
            raise ValueError(f"sent gradient has {sent.numel} elements, compensated one {compensated.numel()}")
        # Assignment, not subtraction in place: indices are unique, and the exact
        # difference keeps a lossless codec's residual at exactly zero there.
        compensated[sent.indices] = compensated[sent.indices] - sent.values.to(compensated.dtype)
        self.residuals[key] = compensated
        if self.momentum and key in self.velocities:
            self.velocities[key][sent.indices] = 0

    def update_dense(self, key: Hashable, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """Residual := ``compensated - sent`` for a bucket that went dense (``sent`` is
        the dense tensor handed to allreduce; only its rounding remains)."""
        if not self.enabled:
            return
        residual = compensated.sub_(sent.reshape(-1).to(compensated.dtype))
        self.residuals[key] = residual
        if self.momentum and key in self.velocities:
            self.velocities[key].zero_()

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The current residual of ``key`` (None before its first update)."""
        return self.residuals.get(key)

    def reset(self) -> None:
        self.residuals.clear()
        self.velocities.clear()

    def state_dict(self) -> dict[str, Any]:
        """Residuals and velocities as CPU tensors (portable between devices)."""
        return {
            "enabled": self.enabled,
            "momentum": self.momentum,
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
            "velocities": {k: v.detach().cpu().clone() for k, v in self.velocities.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("residuals", "velocities"):
            if not isinstance(state.get(field), dict):
                raise ValueError(f"error feedback state: missing or malformed {field!r}")
        # Tensors move to the gradient's device on first use (see _stored).
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()}
        self.velocities = {k: v.clone() for k, v in state["velocities"].items()}

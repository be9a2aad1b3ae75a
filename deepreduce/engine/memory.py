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

*Held* names (:meth:`ErrorFeedback.hold`, set by a front end before a bucket is
compensated) send nothing of their residual or velocity this step and keep both as they
were: DDP with ``find_unused_parameters`` (or ``static_graph``) does not copy the averaged
bucket back into a parameter no rank used, so whatever its slot carried would be lost.

A key may cover several named parts (one top-k over a whole DDP bucket): ``parts``
lists ``(name, numel)`` in buffer order. Such a residual is saved split by part, and a
key that is not stored is assembled from the parts wherever they were kept before (a
parameter's own key, or another bucket's), and a parameter's own key takes its part
out of a multi-part key that holds it, so a changed bucket layout -- DDP's rebuilt
buckets, another ``bucket_cap_mb``, packed payloads that follow the density, a resume
in another training loop -- loses nothing and never mixes parameters.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable, Sequence

import torch

from ..sparse import SparseGrad

logger = logging.getLogger(__name__)


def memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype residuals of a ``dtype`` gradient are kept in (fp32 for fp16/bf16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def subtract_sent(compensated: torch.Tensor, sent: SparseGrad) -> torch.Tensor:
    """``compensated[i] -= sent.values`` at ``sent``'s (unique) indices, in place.

    Assignment of the exact difference, not subtraction in place, so a lossless codec
    leaves exactly zero there; ``index_select``/``index_copy_`` give the values advanced
    indexing would, at a fraction of its cost on the CPU."""
    indices = sent.indices
    return compensated.index_copy_(0, indices, compensated.index_select(0, indices) - sent.values.to(compensated.dtype))


def _pieces(grad: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    pieces = [grad] if isinstance(grad, torch.Tensor) else list(grad)
    if not pieces:
        raise ValueError("error feedback: a gradient needs at least one piece")
    return [piece.detach().reshape(-1) for piece in pieces]


def _joined(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A new flat tensor of the pieces, in ``dtype``."""
    return pieces[0].to(dtype, copy=True) if len(pieces) == 1 else torch.cat(pieces).to(dtype)


def _accumulate(target: torch.Tensor, pieces: list[torch.Tensor], sign: int = 1) -> torch.Tensor:
    """``target += sign * pieces`` (laid end to end), in place, piece by piece."""
    offset = 0
    for piece in pieces:
        view = target.narrow(0, offset, piece.numel())
        view.add_(piece) if sign > 0 else view.sub_(piece)
        offset += piece.numel()
    return target


class ErrorFeedback:
    """Residual memory per key (a parameter's name, or a bucket's index).

    Args:
        enabled: with ``False`` :meth:`compensate` returns the gradient (as the memory
            dtype) and :meth:`update` keeps nothing: plain lossy compression.
        momentum: DGC momentum correction factor in ``[0, 1)``; 0 disables it.

    A residual whose size or dtype no longer matches (a key reused for another tensor)
    is dropped and starts again from zero, logged at INFO.
    """

    def __init__(self, enabled: bool = True, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.enabled = bool(enabled)
        self.momentum = float(momentum)
        self.residuals: dict[Hashable, torch.Tensor] = {}
        self.velocities: dict[Hashable, torch.Tensor] = {}
        self.layouts: dict[Hashable, tuple[tuple[Hashable, int], ...]] = {}  # key -> its parts
        self._pending: dict[Hashable, tuple[torch.Tensor, bool, bool]] = {}  # key -> (grad, had residual, had velocity)
        self._hold: set[Hashable] = set()  # names the next compensations leave out (see hold())
        # key -> [(offset, numel, residual slice, velocity slice)] set aside by compensate, put back by update/restore
        self._held: dict[Hashable, list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A compensation in flight refers to a live gradient bucket: never pickled.
        return {**self.__dict__, "_pending": {}, "_hold": set(), "_held": {}}

    def hold(self, names: Sequence[Hashable]) -> None:
        """Leave the residual and velocity of ``names`` (keys, or parts of a multi-part key)
        out of the compensations that follow and keep them unchanged through the
        update: for parameters whose gradient slot the caller will not use this step
        (DDP's unused parameters). Replaces the previous set; ``hold(())`` clears it."""
        self._hold = set(names)

    def _set_aside(self, key: Hashable, parts: Sequence[tuple[Hashable, int]] | None, numel: int) -> None:
        """Move the held slices of ``key``'s residual and velocity out of the way (zeroed in
        place, copies kept) before it is compensated."""
        if not self._hold:
            return
        spans = [(0, numel)] if key in self._hold else []
        if parts is not None:
            offset = 0
            for name, part_numel in parts:
                if name in self._hold:
                    spans.append((offset, part_numel))
                offset += part_numel
        held = []
        for offset, length in spans:
            kept = []
            for table in (self.residuals, self.velocities):
                stored = table.get(key)
                if stored is None or stored.numel() != numel:
                    kept.append(None)
                    continue
                piece = stored.narrow(0, offset, length)
                kept.append(piece.clone())
                piece.zero_()
            if kept != [None, None]:
                held.append((offset, length, kept[0], kept[1]))
        if held:
            self._held[key] = held

    def _put_back(self, key: Hashable) -> None:
        """Return the slices :meth:`_set_aside` kept to ``key``'s residual and velocity."""
        for offset, length, residual, velocity in self._held.pop(key, ()):
            for table, piece in ((self.residuals, residual), (self.velocities, velocity)):
                if piece is None:
                    continue
                stored = table.get(key)
                if stored is None:  # nothing left there this step (e.g. a velocity cleared): start from zeros
                    continue
                stored.narrow(0, offset, length).copy_(piece)

    def _split(self, key: Hashable) -> None:
        """Store the parts of a multi-part key under their own names (views, no copy)."""
        parts = self.layouts.pop(key)
        for table in (self.residuals, self.velocities):
            stored = table.pop(key, None)
            if stored is None:
                continue
            offset = 0
            for name, numel in parts:
                table[name] = stored.narrow(0, offset, numel)
                offset += numel

    def _assemble(self, key: Hashable, parts: Sequence[tuple[Hashable, int]]) -> None:
        """Make ``key``'s entries from its parts, wherever they were kept."""
        names = {name for name, _ in parts}
        for other in [k for k, layout in self.layouts.items() if k != key and names & {n for n, _ in layout}]:
            self._split(other)
        self.layouts[key] = tuple(parts)
        for table in (self.residuals, self.velocities):
            pieces = [table.pop(name, None) for name, _ in parts]
            present = [p for p in pieces if p is not None]
            if not present:
                continue
            like = present[0]
            for (name, numel), piece in zip(parts, pieces):
                if piece is not None and (piece.numel() != numel or piece.dtype != like.dtype):
                    logger.info("error feedback: %s changed from %d %s to %d elements; its memory restarts from zero",
                                name, piece.numel(), piece.dtype, numel)
            table[key] = torch.cat([
                p.reshape(-1).to(like.device) if p is not None and p.numel() == numel and p.dtype == like.dtype
                else torch.zeros(numel, dtype=like.dtype, device=like.device)
                for (_, numel), p in zip(parts, pieces)
            ])

    def _claim(self, key: Hashable) -> None:
        """Split the multi-part key that holds ``key`` as a part, if one does (a tensor
        that shared a payload travels on its own again)."""
        for whole, parts in list(self.layouts.items()):
            if any(name == key for name, _ in parts):
                self._split(whole)
                return

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

    def compensate(self, key: Hashable, grad: torch.Tensor | Sequence[torch.Tensor],
                   parts: Sequence[tuple[Hashable, int]] | None = None) -> torch.Tensor:
        """``grad + residual`` (or ``velocity + residual`` with momentum), flat, in the
        memory dtype; ``grad`` itself is not modified. ``grad`` may be a sequence of
        tensors: the pieces of one gradient in order (a key whose parts lie apart in the
        buffer), read where they lie. ``parts``: the named parts the key covers, in order
        (see the module docstring).

        The sum is made in place in the residual's storage (one pass, no new buffer of
        the bucket's size), so the residual is *consumed*: call :meth:`update`,
        :meth:`update_dense` or :meth:`restore` with the returned tensor before the next
        compensate."""
        pieces = _pieces(grad)
        numel = sum(piece.numel() for piece in pieces)
        dtype, device = memory_dtype(pieces[0].dtype), pieces[0].device
        if not self.enabled:
            return _joined(pieces, dtype)
        if parts is not None and key not in self.layouts:
            self._assemble(key, parts)
        elif parts is None and key not in self.residuals and key not in self.velocities:
            self._claim(key)
        self._set_aside(key, parts, numel)
        had_velocity = False
        if self.momentum:
            velocity = self._stored(self.velocities, key, numel, dtype, device)
            had_velocity = velocity is not None
            if velocity is None:
                velocity = self.velocities[key] = _joined(pieces, dtype)
            else:
                _accumulate(velocity.mul_(self.momentum), pieces)
        residual = self._stored(self.residuals, key, numel, dtype, device)
        self._pending[key] = (pieces, residual is not None, had_velocity)
        if residual is not None:
            del self.residuals[key]  # consumed; update() stores the new one
        if self.momentum:
            velocity = self.velocities[key]
            return velocity.to(dtype, copy=True) if residual is None else residual.add_(velocity)
        return _joined(pieces, dtype) if residual is None else _accumulate(residual, pieces)

    def restore(self, key: Hashable, compensated: torch.Tensor) -> None:
        """Undo :meth:`compensate` for a step whose update is dropped (another rank's
        gradient was not finite): the residual and velocity return to what they were,
        up to one rounding of the subtraction."""
        pending = self._pending.pop(key, None)
        if not self.enabled or pending is None:
            return
        pieces, had_residual, had_velocity = pending
        if self.momentum:
            velocity = self.velocities[key]
            if had_residual:
                self.residuals[key] = compensated.sub_(velocity)
            if had_velocity:
                _accumulate(velocity, pieces, -1).div_(self.momentum)
            else:
                del self.velocities[key]
        elif had_residual:
            self.residuals[key] = _accumulate(compensated, pieces, -1)
        self._put_back(key)

    def update(self, key: Hashable, compensated: torch.Tensor, sent: SparseGrad) -> None:
        """Residual := ``compensated - sent`` (``sent`` as the receivers decode it).

        Takes ownership of ``compensated`` (it becomes the residual, updated in place)."""
        if not self.enabled:
            return
        self._pending.pop(key, None)
        if sent.numel != compensated.numel():
            raise ValueError(f"sent gradient has {sent.numel} elements, compensated one {compensated.numel()}")
        self.residuals[key] = subtract_sent(compensated, sent)
        if self.momentum and key in self.velocities:
            self.velocities[key].index_fill_(0, sent.indices, 0)
        self._put_back(key)

    def update_dense(self, key: Hashable, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """Residual := ``compensated - sent`` for a bucket that went dense (``sent`` is
        the dense tensor handed to allreduce; only its rounding remains)."""
        if not self.enabled:
            return
        self._pending.pop(key, None)
        residual = compensated.sub_(sent.reshape(-1).to(compensated.dtype))
        self.residuals[key] = residual
        if self.momentum and key in self.velocities:
            self.velocities[key].zero_()
        self._put_back(key)

    def flush(self, key: Hashable, grad: torch.Tensor, parts: Sequence[tuple[Hashable, int]] | None = None) -> None:
        """Add ``key``'s residual into ``grad`` (in place) and forget it: for a tensor
        that is sent dense from now on, so what compression held back goes out with it."""
        held = key in self.residuals or any(name in self.residuals for name, _ in parts or ())
        if not self.enabled or not held:
            return
        hold, self._hold = self._hold, set()  # a flush sends everything
        compensated = self.compensate(key, grad, parts)
        self._hold = hold
        grad.copy_(compensated.reshape(grad.shape))
        self._pending.pop(key, None)

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The current residual of ``key``, or of a part of a multi-part key (a view);
        None before its first update."""
        stored = self.residuals.get(key)
        if stored is not None or key in self.layouts:
            return stored
        for whole, parts in self.layouts.items():
            offset = 0
            for name, numel in parts:
                if name == key:
                    stored = self.residuals.get(whole)
                    return None if stored is None else stored.narrow(0, offset, numel)
                offset += numel
        return None

    def reset(self) -> None:
        self.residuals.clear()
        self.velocities.clear()
        self.layouts.clear()
        self._pending.clear()
        self._held.clear()

    def _by_part(self, table: dict[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = {}
        for key, stored in table.items():
            parts = self.layouts.get(key)
            if parts is None:
                out[key] = stored.detach().cpu().clone()
                continue
            offset = 0
            for name, numel in parts:
                out[name] = stored.narrow(0, offset, numel).detach().cpu().clone()
                offset += numel
        return out

    def state_dict(self) -> dict[str, Any]:
        """Residuals and velocities as CPU tensors (portable between devices), a
        multi-part key's split by part (portable between bucket layouts)."""
        return {
            "enabled": self.enabled,
            "momentum": self.momentum,
            "residuals": self._by_part(self.residuals),
            "velocities": self._by_part(self.velocities),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("residuals", "velocities"):
            if not isinstance(state.get(field), dict):
                raise ValueError(f"error feedback state: missing or malformed {field!r}")
        # Tensors move to the gradient's device on first use (see _stored).
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()}
        self.velocities = {k: v.clone() for k, v in state["velocities"].items()}
        self.layouts.clear()
        self._pending.clear()
        self._held.clear()

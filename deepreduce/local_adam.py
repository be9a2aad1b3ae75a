"""``LocalAdamW``: AdamW for update mode, whose step is the one data-parallel training
would take, estimated from one rank's own statistics.

In update mode (:class:`deepreduce.UpdateSync`) every rank runs its optimizer on its own
gradient, from a batch W times smaller than the data-parallel one, and the ranks'
updates are averaged. Adam divides by the root of its second moment ``v``; a rank's
``v`` holds its own gradient noise, W times larger than the noise of the averaged
gradient data-parallel Adam sees, so each rank steps too short where noise dominates
(and the average of the ranks' steps is shorter still) but about right where the signal
dominates. No single learning-rate factor fixes both.

``LocalAdamW`` splits ``v`` per element into signal and noise with what Adam already
keeps: the first moment ``m`` is an average over ~``2 / (1 - beta1)`` steps, so ``m**2``
holds the signal and only a ``(1 - beta1) / (1 + beta1)`` share of the noise variance;
the rest of ``v - m**2`` is noise. The step then divides by

    v_dp = max(v - (1 - 1/W) * noise,  v / W),     noise = (v - m**2) / (2 * beta1 / (1 + beta1))

(bias-corrected ``m`` and ``v``): the second moment of a gradient averaged over W ranks.
Its first moment, learning rate, weight decay and ``eps`` are AdamW's. With
``world_size=1`` it is AdamW.

``noise="tracked"`` estimates the noise from a third moment kept for it instead: an
average, over Adam's ``v`` horizon, of the squared error of the gradient against the
first moment before it (``g - m_prev``; that error holds the noise plus ``m``'s own
share of it, ``noise * 2 / (1 + beta1)``). ``m**2`` above is one short average, so the
default estimate swings from step to step; the tracked one is averaged as long as ``v``,
at the cost of one more tensor per parameter.

Tuning: use the learning rate tuned for data-parallel AdamW (no ``sqrt(W)`` or ``W``
factor). ``world_size`` is the number of ranks whose updates are averaged (default: the
torch.distributed world); with :class:`UpdateSync` and ``local_steps`` H > 1 keep it at
W: each local step's gradient is still one rank's. For data-parallel training (averaged
gradients) use plain AdamW. ``noise="tracked"`` was better than the default on some tasks
and not on others (``benchmarks/RESULTS.md``): run update mode uncompressed
(``start_iter`` past the end) beside data-parallel AdamW with each, and keep the one
whose gap is smaller. Compressed, with :class:`deepreduce.UpdateSync`'s
``density_schedule=DensityFollowsLR(..., power=0.5)``, ``"tracked"`` was within 1 % of
dense on every task measured: the recommended setting there.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .errors import ConfigError


NOISE_ESTIMATES = ("moments", "tracked")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_options(options: dict[str, Any], where: str) -> None:
    """ConfigError naming the option (after ``where``, e.g. "param group 1: ") unless
    every option is valid; a bad option in one group would otherwise surface as a wrong
    step or a bare TypeError."""
    world_size = options["world_size"]
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"{where}world_size must be a positive int, got {world_size!r}")
    for name in ("lr", "eps", "weight_decay"):
        value = options[name]
        if not _is_number(value) or not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}{name} must be a finite number >= 0, got {value!r}")
    if options["noise"] not in NOISE_ESTIMATES:
        raise ConfigError(f"{where}noise must be one of {', '.join(NOISE_ESTIMATES)}, got {options['noise']!r}")
    betas = options["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"{where}betas must be two numbers in [0, 1), got {betas!r}")


class LocalAdamW(torch.optim.Optimizer):
    """AdamW whose second moment is estimated as that of the gradient averaged over
    ``world_size`` ranks (see the module docstring).

    Args:
        params: parameters or parameter groups, as for :class:`torch.optim.AdamW`.
        lr, betas, eps, weight_decay: as for AdamW (decoupled weight decay).
        world_size: ranks whose updates are averaged; None: ``torch.distributed``'s
            world size (1 when it is not initialised).
        noise: ``"moments"`` (the noise from ``v - m**2``) or ``"tracked"`` (from a
            running average of the squared error ``g - m_prev``; one more state tensor).

    Parameter groups (here or through :meth:`add_param_group`) may set any of these
    options; each group's are checked as the constructor's are.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        world_size: int | None = None,
        noise: str = "moments",
    ) -> None:
        if world_size is None:
            world_size = _world_size()
        options = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, world_size=world_size, noise=noise)
        _check_options(options, "")
        super().__init__(params, {**options, "betas": tuple(betas)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`, with the group's options
        checked (``world_size=None``: the torch.distributed world)."""
        if isinstance(param_group, dict):  # torch refuses anything else itself
            if "world_size" in param_group and param_group["world_size"] is None:
                param_group["world_size"] = _world_size()
            _check_options({**self.defaults, **param_group}, f"param group {len(self.param_groups)}: ")
            if "betas" in param_group:
                param_group["betas"] = tuple(param_group["betas"])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, except that each group keeps this
        optimizer's ``world_size``: a run resumed on another number of ranks averages over
        the new count (torch would bring back the saved one). A state saved without
        ``noise`` takes this optimizer's."""
        worlds = [(group["world_size"], group["noise"]) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (world, noise) in zip(self.param_groups, worlds):
            group["world_size"] = world
            group.setdefault("noise", noise)  # saved before the option existed

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, world = group["lr"], group["world_size"]
            signal_share = 2 * beta1 / (1 + beta1) if beta1 > 0 else 1.0  # of the noise variance, the part not in m**2
            tracked = group["noise"] == "tracked" and world > 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LocalAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if tracked and "error_sq" not in state:  # counted apart: a state may gain it on resuming
                    state["error_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["error_steps"] = 0
                state["step"] += 1
                t = state["step"]
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                p.mul_(1 - lr * group["weight_decay"])
                if tracked and t > 1:  # the gradient's error against the first moment before it
                    error = g - m / (1 - beta1 ** (t - 1))
                    state["error_sq"].mul_(beta2).addcmul_(error, error, value=1 - beta2)
                    state["error_steps"] += 1
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1 ** t)
                v_hat = v / (1 - beta2 ** t)
                if world > 1:
                    if tracked and state["error_steps"]:
                        noise = state["error_sq"] * ((1 + beta1) / (2 * (1 - beta2 ** state["error_steps"])))
                    else:  # no error yet (the first step)
                        noise = torch.addcmul(v_hat, m_hat, m_hat, value=-1).clamp_min_(0).div_(signal_share)
                    v_hat = torch.maximum(v_hat.sub_(noise, alpha=1 - 1 / world), v / ((1 - beta2 ** t) * world))
                p.addcdiv_(m_hat, v_hat.sqrt_().add_(group["eps"]), value=-lr)
        return loss

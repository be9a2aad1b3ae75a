"""What the framework integrations share: importing the framework with an error that names
the extra, checking the options, and one rank's deepreduce state for checkpoints.

A rank's entry holds what differs between ranks and what the framework's own checkpoint
(written by rank 0 alone) does not keep: the hook's residuals in gradient mode; in update
mode the synchroniser's state, this rank's optimizer states (each rank steps its optimizer
on its own gradient, so Adam's moments differ) and, where ranks' parameters differ between
exchanges (``keep_unsent``, ``overlap``, ``local_steps > 1``), this rank's parameters.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from types import ModuleType
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from ..compressor import Compressor
from ..errors import ConfigError
from ..hooks import DeepReduceState
from ..engine import Engine
from ..optim import UpdateSync, _PerExchange, check_update_settings

logger = logging.getLogger("deepreduce")

# Layout of a rank's entry in the frameworks' checkpoints; bump when it changes.
STATE_FORMAT = 1


def require(modules: tuple[str, ...], extra: str, what: str) -> ModuleType:
    """The first of ``modules`` that imports, else ImportError naming the pip extra."""
    errors = []
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError(
        f"deepreduce.integrations.{extra} needs {what}, which is not installed: "
        f"pip install 'deepreduce[{extra}]' (tried {'; '.join(errors)})"
    )


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def check_state(state: DeepReduceState | str | None, update: Mapping[str, Any] | None) -> DeepReduceState | None:
    """The gradient-mode state to use (None in update mode), checked now rather than in
    the training processes."""
    if update is not None:
        if state is not None:
            raise ConfigError("pass either state= (gradient mode, the DDP hook) or update= (update mode), not both")
        return None
    if state is None:
        return DeepReduceState()
    if isinstance(state, str):
        return DeepReduceState(compressor=state)
    if not isinstance(state, DeepReduceState):
        raise ConfigError(f"state must be a deepreduce.DeepReduceState or a compressor spec string, got {type(state).__name__}")
    if state.process_group is not None:
        raise ConfigError("the framework makes the process group: build the DeepReduceState with process_group=None "
                          "(the default group)")
    return state


def check_update_options(update: Any) -> dict[str, Any]:
    """The update mode's options (:class:`deepreduce.UpdateSync` keyword arguments other
    than the parameters, group, transport and DDP model, which the integration supplies),
    checked by name now rather than in the training processes."""
    if not isinstance(update, Mapping):
        raise ConfigError(f"update must be a dict of deepreduce.UpdateSync options, got {type(update).__name__}")
    supplied = {"self", "named_parameters", "process_group", "transport", "ddp"}
    allowed = [name for name in inspect.signature(UpdateSync.__init__).parameters if name not in supplied]
    unknown = sorted(set(update) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown update-mode options {unknown}; UpdateSync takes {', '.join(allowed)} "
                          "(the parameters, process group and DDP model are supplied by the integration)")
    compressor = update.get("compressor")
    if compressor == "auto":
        raise ConfigError("update['compressor']='auto' is for the gradient hook; the update mode needs a compressor "
                          "spec such as 'topk:0.035/eliasfano/uniform:bits=1'")
    if isinstance(compressor, str):
        compressor = Compressor.from_spec(compressor)  # a bad spec fails here, with the spec's own message
    elif compressor is not None and not isinstance(compressor, Compressor):
        raise ConfigError(f"update['compressor'] must be a Compressor or a spec string, got {type(compressor).__name__}")
    # Every other option as UpdateSync checks it, so a bad value fails here and not in each worker.
    signature = inspect.signature(UpdateSync.__init__).parameters
    options = {name: signature[name].default for name in allowed} | dict(update)
    check_update_settings(**{name: options[name] for name in (
        "local_steps", "outer_lr", "outer_momentum", "nesterov", "overlap", "keep_unsent", "unsent_scale", "broadcast",
        "error_feedback")})
    schedule = options["density_schedule"]
    Engine(lambda: None, compressor if compressor is not None else Compressor.from_spec(options["compressor"]),  # never called
           min_numel=options["min_numel"], error_feedback=options["error_feedback"],
           dense_fallback=options["dense_fallback"], granularity=options["granularity"], start_iter=options["start_iter"],
           nonfinite=options["nonfinite"], stats_every=options["stats_every"],
           small_compressor=options["small_compressor"], scheme=options["scheme"],
           density_scale=None if schedule is None else _PerExchange(schedule, options["local_steps"]))  # as UpdateSync reads it
    return dict(update)


def parameters_differ(sync: UpdateSync) -> bool:
    """Whether ranks' parameters may differ at a checkpoint (then each rank saves its own)."""
    return sync.keep_unsent or sync.overlap or sync.local_steps > 1


def capture(state: DeepReduceState | None, sync: UpdateSync | None, optimizers: Iterable[torch.optim.Optimizer],
            rank: int, world_size: int, step: int) -> dict[str, Any]:
    """This rank's entry (tensors on the CPU)."""
    entry: dict[str, Any] = {"format": STATE_FORMAT, "rank": rank, "world_size": world_size, "step": step}
    if sync is None:
        assert state is not None
        entry.update(mode="gradient", hook=state.state_dict())
        return entry
    entry.update(mode="update", sync=sync.state_dict(), optimizers=[to_cpu(o.state_dict()) for o in optimizers])
    entry["parameters"] = ({name: to_cpu(p) for name, p in sync.named_parameters}
                           if parameters_differ(sync) else None)
    return entry


def check_entry(entry: Any, rank: int, world_size: int, mode: str, where: str) -> None:
    """ValueError naming what does not fit, for an entry this rank is about to load."""
    if not isinstance(entry, Mapping) or entry.get("format") != STATE_FORMAT:
        raise ValueError(f"{where}: not a deepreduce integration state (format {STATE_FORMAT})")
    if entry.get("world_size") != world_size:
        raise ValueError(f"{where}: saved by {entry.get('world_size')} ranks, resumed by {world_size}; residuals "
                         "belong to ranks and cannot be redistributed")
    if entry.get("rank") != rank:
        raise ValueError(f"{where}: holds rank {entry.get('rank')}'s state, not rank {rank}'s")
    if entry.get("mode") != mode:
        raise ValueError(f"{where}: saved in {entry.get('mode')} mode, resumed in {mode} mode")


def restore(entry: Mapping[str, Any], state: DeepReduceState | None, sync: UpdateSync | None,
            optimizers: list[torch.optim.Optimizer]) -> None:
    """Load a rank's entry (checked by :func:`check_entry`) into the running objects."""
    if sync is None:
        assert state is not None
        state.load_state_dict(entry["hook"])
        return
    saved = entry["optimizers"]
    if len(saved) != len(optimizers):
        raise ValueError(f"deepreduce state holds {len(saved)} optimizer states, the run has {len(optimizers)} optimizers")
    sync.load_state_dict(entry["sync"])
    for optimizer, optimizer_state in zip(optimizers, saved):
        optimizer.load_state_dict(optimizer_state)
    parameters = entry.get("parameters")
    if parameters is not None:
        with torch.no_grad():
            for name, p in sync.named_parameters:
                p.copy_(parameters[name])


def gather_to_rank0(entry: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's entry on rank 0 (None elsewhere); collective over the default group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [entry]
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(entry, gathered, dst=0)
    return gathered


def world() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def stats_of(state: DeepReduceState | None, sync: UpdateSync | None) -> dict[str, Any]:
    """The running mode's stats."""
    return sync.stats() if sync is not None else state.stats() if state is not None else {}

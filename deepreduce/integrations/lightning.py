"""PyTorch Lightning: :class:`DeepReduceStrategy`, a DDP strategy that compresses what the
ranks exchange (``pip install 'deepreduce[lightning]'``).

    import deepreduce as dr
    from deepreduce.integrations.lightning import DeepReduceStrategy

    strategy = DeepReduceStrategy(dr.DeepReduceState(compressor="topk:0.01/eliasfano/fp16", start_iter=10))
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=5,
                         callbacks=[pl.callbacks.ModelCheckpoint(save_last=True)])
    trainer.fit(model, datamodule)              # trainer.fit(..., ckpt_path="last") resumes exactly
    strategy.stats()                            # sent_bytes, dense_bytes, ratio, compressed_buckets, ...

What it does that ``DDPStrategy(ddp_comm_hook=...)`` does not:

- registers the hook on every device and backend (Lightning registers communication hooks
  only on CUDA and silently drops them on CPU/gloo);
- names the residuals after the LightningModule's parameters;
- keeps every rank's state in the checkpoint: Lightning writes rank 0's checkpoint only,
  but each rank's residuals differ, so at every save the ranks' states are gathered into
  rank 0's checkpoint file (key ``"deepreduce"``, one entry per rank) and at resume each
  rank loads its own. One file resumes the whole job: a resumed run continues as the
  uninterrupted one would, bit for bit on CPU. The price is memory on rank 0 while it
  saves: about ``world_size`` times the residuals (gradient mode) or, in update mode,
  the synchroniser's and optimizer's state;
- runs the update mode: ``DeepReduceStrategy(update=dict(compressor=..., keep_unsent=True))``
  builds a :class:`deepreduce.UpdateSync` over the module's parameters, makes DDP keep
  local gradients, calls ``sync.step()`` after every optimizer step and ``sync.finish()``
  when training ends (every rank then holds the same parameters). Each rank's optimizer
  state (and, where ranks' parameters differ between exchanges, its parameters) travels
  in the checkpoint too. One optimizer only; raise Adam's learning rate as
  :mod:`deepreduce.optim` advises. ``strategy.sync.consensus()`` evaluates the agreed
  parameters mid-run when they differ (``keep_unsent``, ``overlap``, ``local_steps > 1``);
- works with ``start_method="spawn"`` (``ddp_spawn``): the state pickles into the
  workers, and ``strategy.stats()`` in the main process reports rank 0's counters when
  the workers end (the ``state`` object the main process holds is a copy the workers
  never touch).

Checkpoints saved without this strategy resume with empty residuals (a warning says so);
a checkpoint saved by another number of ranks cannot be resumed with its residuals (an
error says so). Works with ``pytorch_lightning`` (the extra installs it) or, when that is
not installed, the ``lightning`` package's ``lightning.pytorch``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable, Mapping

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..hooks import DeepReduceState, deepreduce_hook
from ..optim import UpdateSync
from . import _common
from ._common import check_entry, check_state, check_update_options, require

_pl = require(("pytorch_lightning", "lightning.pytorch"), "lightning", "PyTorch Lightning")
_DDPStrategy = importlib.import_module(f"{_pl.__name__}.strategies").DDPStrategy
_MultiProcessingLauncher = importlib.import_module(f"{_pl.__name__}.strategies.launchers.multiprocessing")._MultiProcessingLauncher

logger = logging.getLogger("deepreduce")

#: The key of the per-rank states in Lightning's checkpoint dict.
CHECKPOINT_KEY = "deepreduce"

_MISSING = object()  # a resumed checkpoint had no deepreduce state


def _strategy_options() -> set[str]:
    """The keywords DDPStrategy takes, its own and those it passes to DistributedDataParallel."""
    names = set()
    for function in (_DDPStrategy.__init__, DistributedDataParallel.__init__):
        names |= {p.name for p in inspect.signature(function).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "module"}


class DeepReduceStrategy(_DDPStrategy):
    """Lightning's DDP strategy with deepreduce compression, on any device and backend.

    Args:
        state: gradient mode (the DDP hook): a :class:`deepreduce.DeepReduceState` built
            with ``process_group=None``, or a compressor spec string for one with default
            options. Default: ``DeepReduceState()``.
        update: update mode instead: the :class:`deepreduce.UpdateSync` options as a dict
            (``compressor``, ``local_steps``, ``keep_unsent``, ...); the strategy supplies
            the parameters, process group and DDP model.
        **kwargs: :class:`DDPStrategy` arguments (``process_group_backend``,
            ``start_method="spawn"``, ``find_unused_parameters``, ``timeout``, ...), except
            the communication-hook ones, which this strategy owns.

    Options are checked here, in the process that builds the Trainer, so a bad spec or an
    unknown option fails before any worker starts.
    """

    strategy_name = "deepreduce"

    def __init__(self, state: DeepReduceState | str | None = None, *, update: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        for name in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"):
            if kwargs.get(name) is not None:
                raise ConfigError(f"DeepReduceStrategy registers its own communication hook; {name}= cannot be combined "
                                  "with it (use DDPStrategy for other hooks)")
        unknown = sorted(set(kwargs) - _strategy_options())
        if unknown:  # DDPStrategy hands them to DistributedDataParallel, which fails only in the workers
            raise ConfigError(f"DeepReduceStrategy: {', '.join(f'{name}=' for name in unknown)} is not an option of "
                              "DDPStrategy or DistributedDataParallel; compression options go in state= (a "
                              "DeepReduceState or a spec string, gradient mode) or update= (a dict, update mode)")
        super().__init__(**kwargs)
        self._update = None if update is None else check_update_options(update)
        self.state: DeepReduceState | None = check_state(state, self._update)
        self.sync: UpdateSync | None = None
        self._configured = False  # the hook or synchroniser runs in this process
        self._restore_entry: Any = None  # this rank's saved entry, loaded at train start
        self._reported_stats: dict[str, Any] | None = None  # rank 0's, sent back by spawned workers

    @property
    def mode(self) -> str:
        """``"gradient"`` (the DDP hook) or ``"update"`` (:class:`deepreduce.UpdateSync`)."""
        return "gradient" if self._update is None else "update"

    def stats(self) -> dict[str, Any]:
        """This rank's counters (:meth:`deepreduce.DeepReduceState.stats` or
        :meth:`deepreduce.UpdateSync.stats`); in the main process of a spawned run, rank
        0's counters as its worker ended."""
        if not self._configured and self._reported_stats is not None:
            return dict(self._reported_stats)
        return _common.stats_of(self.state, self.sync)

    # --- wiring ---------------------------------------------------------------------------

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _MultiProcessingLauncher:
            self._launcher = _StatsLauncher(self, start_method=self._start_method)

    def configure_ddp(self) -> None:
        """Wrap the module in DDP (as Lightning does), then register deepreduce on it."""
        super().configure_ddp()
        module = self.lightning_module
        if self._update is None:
            assert self.state is not None
            self.state.name_parameters(module.named_parameters())
            self.model.register_comm_hook(self.state, deepreduce_hook)
        else:
            previous = self.sync
            self.sync = UpdateSync(module.named_parameters(), ddp=self.model, **self._update)
            if previous is not None and set(previous.anchors) == set(self.sync.anchors):
                self.sync.load_state_dict(previous.state_dict())  # a second fit() in this process continues
        self._configured = True

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if self.sync is not None and len(self.optimizers) != 1:
            raise ConfigError(f"the update mode steps one optimizer per batch; this module configures "
                              f"{len(self.optimizers)} optimizers")

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.sync is not None:
            self.sync.step()
        return output

    def on_train_start(self) -> None:
        super().on_train_start()
        entry, self._restore_entry = self._restore_entry, None
        if entry is _MISSING:
            logger.warning("deepreduce: the resumed checkpoint holds no deepreduce state (saved without "
                           "DeepReduceStrategy?); residuals start empty")
        elif entry is not None and self._configured:
            _common.restore(entry, self.state, self.sync, self.optimizers)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.sync is not None:
            self.sync.finish()  # every rank ends with the same parameters

    def teardown(self) -> None:
        self._restore_entry = None
        super().teardown()

    # --- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Gather every rank's deepreduce state into rank 0's checkpoint, then save it.
        Collective, as ``trainer.save_checkpoint`` already is. Weights-only checkpoints
        (no optimizer states) carry no deepreduce state."""
        if self._configured and "optimizer_states" in checkpoint:
            entry = _common.capture(self.state, self.sync, self.optimizers, self.global_rank, self.world_size,
                                    int(checkpoint.get("global_step", 0)))
            gathered = _common.gather_to_rank0(entry)
            if gathered is not None:
                checkpoint = {**checkpoint, CHECKPOINT_KEY: {"format": _common.STATE_FORMAT, "mode": self.mode,
                                                            "world_size": self.world_size, "ranks": gathered}}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Lightning's checkpoint, minus the deepreduce entries; this rank's is kept and
        loaded when training starts (after Lightning restored the optimizers)."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        saved = checkpoint.pop(CHECKPOINT_KEY, None)
        if not self._fitting():
            # validate / test / predict: no residuals are needed, so a checkpoint from another
            # number of ranks or the other mode evaluates as well
            self._restore_entry = None
            return checkpoint
        if saved is None:
            self._restore_entry = _MISSING
            return checkpoint
        where = f"checkpoint {checkpoint_path}"
        if not isinstance(saved, Mapping) or not isinstance(saved.get("ranks"), list):
            raise ValueError(f"{where}: malformed {CHECKPOINT_KEY!r} entry")
        if len(saved["ranks"]) != self.world_size:
            raise ValueError(f"{where}: deepreduce state saved by {len(saved['ranks'])} ranks, resumed by "
                             f"{self.world_size}; residuals belong to ranks and cannot be redistributed (resume "
                             f"with {len(saved['ranks'])} ranks, or drop checkpoint[{CHECKPOINT_KEY!r}] to start "
                             "with empty residuals)")
        entry = saved["ranks"][self.global_rank]
        check_entry(entry, self.global_rank, self.world_size, self.mode, where)
        self._restore_entry = entry
        return checkpoint

    def _fitting(self) -> bool:
        """Whether the trainer this strategy serves is fitting (True when it cannot tell)."""
        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return fn is None or fn == "fit"

    def __getstate__(self) -> dict[str, Any]:
        # The synchroniser is bound to this process's parameters and group; spawned
        # workers build their own (from the options, which pickle).
        state = super().__getstate__()
        state["sync"] = None
        state["_restore_entry"] = None
        return state


class _StatsLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher that also brings rank 0's deepreduce counters back
    to the main process, and closes each worker's process group when its work is done."""

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        # A spawned worker ends with the interpreter's finalisation; gloo's threads torn
        # down there can abort a run that succeeded ("terminate called without an active
        # exception"). Every rank waits for the others, then closes the group while the
        # interpreter is whole.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        extra["deepreduce_stats"] = self._strategy.stats()
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        self._strategy._reported_stats = extra.get("deepreduce_stats")


__all__ = ["CHECKPOINT_KEY", "DeepReduceStrategy"]

"""Hugging Face ``Trainer``: :class:`DeepReduceCallback` compresses what the ranks exchange
(``pip install 'deepreduce[transformers]'``).

    import deepreduce as dr
    from deepreduce.integrations.transformers import DeepReduceCallback

    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", save_steps=500), train_dataset=ds)
    callback = DeepReduceCallback(trainer, dr.DeepReduceState(compressor="topk:0.01/eliasfano/fp16", start_iter=10))
    trainer.train()                             # trainer.train(resume_from_checkpoint=True) resumes exactly
    callback.stats()                            # sent_bytes, dense_bytes, ratio, compressed_buckets, ...

Launch as any distributed ``Trainer`` run (``torchrun --nproc_per_node=N train.py``); on
CPU ``TrainingArguments(use_cpu=True)`` runs DDP over gloo. The callback takes the trainer
because callbacks are not handed the DDP-wrapped model; it adds itself to the trainer's
callbacks. At ``on_train_begin`` (after the Trainer wrapped the model in DDP and, when
resuming, restored the model, optimizer and scheduler) it:

- gradient mode: registers :func:`deepreduce.deepreduce_hook` on ``trainer.model_wrapped``
  with the residuals named after the model's parameters;
- update mode (``update=dict(compressor=..., keep_unsent=True)``): builds a
  :class:`deepreduce.UpdateSync` over the model's parameters that makes DDP keep local
  gradients, calls ``sync.step()`` after every optimizer step and ``sync.finish()`` when
  training ends (every rank then holds the same parameters, so ``trainer.save_model()``
  saves the agreed model). Raise Adam's learning rate as :mod:`deepreduce.optim` advises.

Checkpoints: the Trainer writes the model and optimizer from rank 0 only, but each rank's
residuals differ (and, in update mode, its optimizer state and, with ``keep_unsent``,
``overlap`` or ``local_steps > 1``, its parameters). So at every save each rank writes its
own ``deepreduce-rank<r>.pt`` into the checkpoint folder, as the Trainer does with its
``rng_state_<r>.pth``, and a resumed run loads it: it continues as the uninterrupted run
would, bit for bit on CPU. The checkpoint folder is found as the Trainer found it
(``checkpoint-<global step>`` under ``output_dir``, which ``resume_from_checkpoint=True``
and paths inside ``output_dir`` give); for a checkpoint elsewhere pass ``resume_from=``.
A checkpoint without deepreduce files resumes with empty residuals (a warning says so);
one saved by another number of ranks, or a folder missing some ranks' files, stops every
rank with an error. ``TrainingArguments(save_only_model=True)`` checkpoints carry no
deepreduce state, as they carry no optimizer state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..hooks import DeepReduceState, deepreduce_hook
from ..optim import UpdateSync
from . import _common
from ._common import check_entry, check_state, check_update_options, logger, require

_transformers = require(("transformers",), "transformers", "Hugging Face transformers")
TrainerCallback = _transformers.TrainerCallback

STATE_FILE = "deepreduce-rank{rank}.pt"


class DeepReduceCallback(TrainerCallback):
    """Compressed communication for a Hugging Face ``Trainer`` running DDP.

    Args:
        trainer: the ``transformers.Trainer`` (the callback adds itself to it).
        state: gradient mode (the DDP hook): a :class:`deepreduce.DeepReduceState` built
            with ``process_group=None``, or a compressor spec string. Default:
            ``DeepReduceState()``.
        update: update mode instead: the :class:`deepreduce.UpdateSync` options as a dict;
            the callback supplies the parameters, process group and DDP model.
        resume_from: the checkpoint folder a resumed run started from, when it is not
            ``<output_dir>/checkpoint-<step>``.
    """

    def __init__(self, trainer: Any, state: DeepReduceState | str | None = None, *,
                 update: Mapping[str, Any] | None = None, resume_from: str | os.PathLike | None = None) -> None:
        if not isinstance(trainer, _transformers.Trainer):
            raise ConfigError(f"DeepReduceCallback(trainer, ...) takes the transformers.Trainer first, got "
                              f"{type(trainer).__name__}")
        if any(isinstance(cb, DeepReduceCallback) for cb in trainer.callback_handler.callbacks):
            raise ConfigError("this Trainer already has a DeepReduceCallback")
        self._update = None if update is None else check_update_options(update)
        self.state: DeepReduceState | None = check_state(state, self._update)
        self.sync: UpdateSync | None = None
        self.trainer = trainer
        self.resume_from = None if resume_from is None else Path(resume_from)
        self._hooked: Any = None  # the DDP model the hook is registered on
        trainer.add_callback(self)

    @property
    def mode(self) -> str:
        """``"gradient"`` (the DDP hook) or ``"update"`` (:class:`deepreduce.UpdateSync`)."""
        return "gradient" if self._update is None else "update"

    def stats(self) -> dict[str, Any]:
        """This rank's counters (:meth:`deepreduce.DeepReduceState.stats` or
        :meth:`deepreduce.UpdateSync.stats`)."""
        return _common.stats_of(self.state, self.sync)

    # --- events ---------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        ddp = self.trainer.model_wrapped
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            if _common.world()[1] > 1:
                raise ConfigError(f"DeepReduceCallback needs the Trainer to run DistributedDataParallel; it wrapped the "
                                  f"model in {type(ddp).__name__} (DeepSpeed, FSDP and DataParallel are not supported)")
            logger.warning("deepreduce: a single process, no DistributedDataParallel: nothing to compress")
            return
        module = self.trainer.model
        if self._update is None:
            assert self.state is not None
            if self._hooked is not ddp:  # DDP takes one hook per model; a second train() keeps it
                self.state.name_parameters(module.named_parameters())
                ddp.register_comm_hook(self.state, deepreduce_hook)
                self._hooked = ddp
        else:
            if self._hooked is ddp:
                raise ConfigError("the update mode cannot start a second train() on the same DDP model")
            self.sync = UpdateSync(module.named_parameters(), ddp=ddp, **self._update)
            self._hooked = ddp
        if state.global_step > 0:
            self._restore(args, state, optimizer)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sync is not None:
            self.sync.step()

    def on_save(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self._hooked is None or args.save_only_model:
            return
        rank, world = _common.world()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        entry = _common.capture(self.state, self.sync, _optimizers(optimizer), rank, world, state.global_step)
        path = folder / STATE_FILE.format(rank=rank)
        torch.save(entry, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a crash mid-write leaves no truncated file behind

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sync is None:
            return
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            return  # every rank loaded the same best model: they agree already
        self.sync.finish()

    # --- resuming ------------------------------------------------------------------------

    def _folder(self, args: Any, state: Any) -> Path | None:
        candidates = [self.resume_from]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        for folder in candidates:
            if folder is not None and (folder / "trainer_state.json").is_file():
                return folder
        return None

    def _restore(self, args: Any, state: Any, optimizer: Any) -> None:
        """Load this rank's file; every rank stops with an error if any rank cannot."""
        rank, world = _common.world()
        folder = self._folder(args, state)
        problem, entry, missing = None, None, folder is None
        if folder is not None:
            path = folder / STATE_FILE.format(rank=rank)
            if path.is_file():
                try:
                    entry = torch.load(path, map_location="cpu", weights_only=True)
                    check_entry(entry, rank, world, self.mode, str(path))
                    if entry.get("step") != state.global_step:
                        raise ValueError(f"{path}: saved at step {entry.get('step')}, the run resumes at step "
                                         f"{state.global_step}")
                except Exception as exc:  # noqa: BLE001 -- reported on every rank below
                    problem = f"rank {rank}: {exc}"
            else:
                missing = True
        reports = _agree((problem, missing))
        problems = [p for p, _ in reports if p]
        if problems:
            raise ValueError("cannot resume the deepreduce state: " + "; ".join(problems))
        if any(m for _, m in reports):
            if not all(m for _, m in reports):
                raise ValueError(f"cannot resume the deepreduce state: {folder} holds deepreduce files for some ranks "
                                 "only (an interrupted save?); resume from an earlier checkpoint")
            where = folder if folder is not None else f"checkpoint-{state.global_step}"
            logger.warning("deepreduce: no deepreduce state found for the resumed checkpoint (%s; saved without "
                           "DeepReduceCallback, or pass resume_from=); residuals start empty", where)
            return
        _common.restore(entry, self.state, self.sync, _optimizers(optimizer))


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return [] if optimizer is None else [optimizer]


def _agree(report: Any) -> list[Any]:
    """Every rank's ``report`` (collective), so that every rank takes the same decision."""
    rank, world = _common.world()
    if world == 1:
        return [report]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, report)
    return gathered


__all__ = ["DeepReduceCallback", "STATE_FILE"]

"""PyTorch Lightning runs with DeepReduceStrategy on 2 CPU processes (tests/test_integrations.py).

    python tests/workers/lightning_runs.py OUT_DIR MODE START_METHOD [PHASES]

MODE is ``gradient`` (the DDP hook), ``update`` (UpdateSync with keep_unsent, SGD) or
``update-adam`` (README's recommended Adam(W) setting: LocalAdamW with its noise tracked, block
top-k, small tensors cyclic, unsent_scale 1.5, densities that follow a schedule); START_METHOD
``popen`` (Lightning's ``ddp``: it starts this script again as rank 1) or ``spawn``
(``ddp_spawn``). PHASES (comma-separated, default all): ``full`` trains EPOCHS epochs,
``first`` the first STOP of them, ``resumed`` resumes from the ``first`` run's ``last.ckpt``
to EPOCHS, ``evaluate`` validates the ``first`` checkpoint on one process. Each fit saves OUT_DIR/ckpt-<phase>/last.ckpt; each rank writes
OUT_DIR/<phase>-rank<r>.json (parameter digest, losses, stats) after each fit, and the main
process OUT_DIR/<phase>-main.json (what ``strategy.stats()`` reports there).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import deepreduce as dr
from deepreduce.cli import exit_distributed_process
from deepreduce.integrations.lightning import DeepReduceStrategy

EPOCHS, STOP = 4, 2
STEPS = EPOCHS * 8  # 256 samples in batches of 16 on 2 ranks


class Regressor(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                       torch.nn.Tanh(), torch.nn.Linear(64, 4))
        self.optimizer = optimizer
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.optimizer == "local-adamw":
            return dr.LocalAdamW(self.parameters(), lr=3e-3, weight_decay=0.01, noise="tracked")
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)


def data() -> DataLoader:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 32, generator=gen)
    return DataLoader(TensorDataset(x, torch.tanh(2 * x[:, :4]) + 0.1 * x[:, 4:8]), batch_size=16, shuffle=True)


def digest(module: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in module.parameters())).hexdigest()


class Report(pl.Callback):
    """Each rank's parameters and counters once the fit ended (after the strategy's own
    end-of-training work: in update mode ``sync.finish()``)."""

    def __init__(self, out: Path, phase: str) -> None:
        self.out, self.phase = out, phase

    def on_fit_end(self, trainer, module):
        strategy = trainer.strategy
        record = {"digest": digest(module), "losses": module.losses, "stats": strategy.stats(),
                  "rank": trainer.global_rank, "world": trainer.world_size}
        (self.out / f"{self.phase}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def strategy(mode: str, start_method: str) -> DeepReduceStrategy:
    if mode == "gradient":
        state = dr.DeepReduceState(compressor="topk:0.05/eliasfano/fp16", start_iter=2, min_numel=256)
        return DeepReduceStrategy(state, start_method=start_method, process_group_backend="gloo")
    if mode == "update-adam":
        # A decaying rate stands in for the schedule; the densities change every exchange, so
        # a resumed run must pick up the exchange count to stay bit for bit.
        schedule = dr.DensityFollowsLR(lambda step: 3e-3 * (1 - step / (2 * STEPS)), STEPS, power=0.5)
        return DeepReduceStrategy(update=dict(compressor="blocktopk:0.215,block=128/blocks:block=128/uniform:bits=1,scale=bf16",
                                              small_compressor="cyclic:0.125/strided/fp16", keep_unsent=True,
                                              unsent_scale=1.5, min_numel=256, density_schedule=schedule),
                                  start_method=start_method, process_group_backend="gloo")
    return DeepReduceStrategy(update=dict(compressor="topk:0.05/eliasfano/uniform:bits=2", keep_unsent=True,
                                          min_numel=256),
                              start_method=start_method, process_group_backend="gloo")


def fit(out: Path, mode: str, start_method: str, phase: str, epochs: int, resume: Path | None) -> None:
    pl.seed_everything(0, verbose=False)
    module = Regressor({"gradient": "adamw", "update": "sgd", "update-adam": "local-adamw"}[mode])
    chosen = strategy(mode, start_method)
    callbacks = [Report(out, phase), pl.callbacks.ModelCheckpoint(dirpath=out / f"ckpt-{phase}", save_last=True,
                                                                  save_top_k=0)]
    trainer = pl.Trainer(strategy=chosen, accelerator="cpu", devices=2, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=out)
    trainer.fit(module, train_dataloaders=data(), ckpt_path=resume)
    if trainer.is_global_zero:
        (out / f"{phase}-main.json").write_text(json.dumps({"stats": chosen.stats(), "digest": digest(module)}))


def evaluate(out: Path, mode: str) -> None:
    """Validate the 2-rank ``first`` checkpoint on one process (no residuals needed)."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(strategy=strategy(mode, "popen"), accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    result = trainer.validate(Regressor("adamw"), dataloaders=data(), ckpt_path=out / "ckpt-first" / "last.ckpt")
    (out / "evaluate.json").write_text(json.dumps(result))


def main(out_dir: str, mode: str, start_method: str, phases: str = "full,first,resumed") -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    for phase in phases.split(","):
        if phase == "evaluate":
            evaluate(out, mode)
            continue
        resume = out / "ckpt-first" / "last.ckpt" if phase == "resumed" else None
        fit(out, mode, start_method, phase, STOP if phase == "first" else EPOCHS, resume)


if __name__ == "__main__":
    main(*sys.argv[1:])
    # As the deepreduce command does: gloo's threads may still hold tensors when the
    # interpreter finalises, and tearing them down then aborts a finished run.
    if dist.is_initialized():
        dist.barrier()
    exit_distributed_process(0)

"""Hugging Face Trainer runs with DeepReduceCallback on 2 CPU processes (tests/test_integrations.py).

    torchrun --standalone --nproc_per_node=2 tests/workers/transformers_runs.py OUT_DIR MODE

MODE is ``gradient`` (the DDP hook), ``update`` (UpdateSync with keep_unsent) or ``dense``
(no callback: the Trainer's own resume, for reference). A tiny randomly initialised GPT-2
(built from a config: nothing is downloaded) trains STEPS steps three ways: uninterrupted,
stopped after STOP steps (checkpoint-STOP saved), and resumed from that checkpoint; with
the callback also resumed from a copy of the checkpoint without its deepreduce files (the
control: residuals then start empty and the run differs). Each rank writes
OUT_DIR/<phase>-rank<r>.json: parameter digest, per-step losses, stats.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import deepreduce as dr
from deepreduce.cli import exit_distributed_process
from deepreduce.integrations.transformers import DeepReduceCallback

STEPS, STOP = 12, 6


class Sequences(torch.utils.data.Dataset):
    """Token sequences counting up by a per-sequence stride: something to learn, no download."""

    def __init__(self, n: int = 96, length: int = 16, vocab: int = 64) -> None:
        gen = torch.Generator().manual_seed(3)
        start = torch.randint(0, vocab, (n, 1), generator=gen)
        stride = torch.randint(1, 4, (n, 1), generator=gen)
        self.ids = (start + stride * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def digest(module: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().contiguous().numpy().tobytes() for p in module.parameters())).hexdigest()


class Record(TrainerCallback):
    """Per-step losses (from the Trainer's log every step) and a stop after STOP steps."""

    def __init__(self, stop: bool) -> None:
        self.stop, self.losses = stop, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop and state.global_step == STOP:
            control.should_save = True
            control.should_training_stop = True


def run(out: Path, mode: str, phase: str) -> None:
    args = TrainingArguments(
        output_dir=str(out / {"resumed": "first"}.get(phase, phase)), per_device_train_batch_size=4,
        max_steps=STEPS, learning_rate=3e-3 if mode == "update" else 2e-3, warmup_steps=2, weight_decay=0.01,
        save_strategy="steps", save_steps=STOP if phase == "first" else 10_000, logging_steps=1,
        report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, ddp_backend="gloo",
    )
    net = model()
    record = Record(stop=phase == "first")
    trainer = Trainer(model=net, args=args, train_dataset=Sequences(), callbacks=[record])
    callback = None
    if mode == "gradient":
        callback = DeepReduceCallback(trainer, dr.DeepReduceState(compressor="topk:0.05/eliasfano/fp16", start_iter=2,
                                                                  min_numel=512))
    elif mode == "update":
        callback = DeepReduceCallback(trainer, update=dict(compressor="topk:0.05/eliasfano/uniform:bits=2",
                                                           keep_unsent=True, min_numel=512))
    trainer.train(resume_from_checkpoint=True if phase in ("resumed", "stateless") else None)
    rank = dist.get_rank()
    record_out = {"digest": digest(net), "losses": record.losses, "global_step": trainer.state.global_step,
                  "stats": callback.stats() if callback else {}, "ddp": type(trainer.model_wrapped).__name__}
    (out / f"{phase}-rank{rank}.json").write_text(json.dumps(record_out))


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    for phase in ("full", "first", "resumed"):
        run(out, mode, phase)
    if mode != "dense":
        if dist.get_rank() == 0:
            shutil.copytree(out / "first" / f"checkpoint-{STOP}", out / "stateless" / f"checkpoint-{STOP}",
                            ignore=shutil.ignore_patterns("deepreduce-*"))
        dist.barrier()
        run(out, mode, "stateless")


if __name__ == "__main__":
    main(*sys.argv[1:])
    # As the deepreduce command does: gloo's threads may still hold tensors when the
    # interpreter finalises, and tearing them down then aborts a finished run.
    if dist.is_initialized():
        dist.barrier()
    exit_distributed_process(0)

"""PyTorch Lightning and Hugging Face Trainer integrations: on 2 CPU processes each sends
compressed bytes, keeps the ranks' parameters identical and resumes from a checkpoint bit
for bit as the uninterrupted run (the processes run gloo on the CPU, whose sums are
deterministic, so equality is exact); in-process: options, pickling, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepreduce as dr
from launching import worker, worker_env
from workers import lightning_runs, transformers_runs

PHASES = ("full", "first", "resumed")


def launch(cmd: list[str], timeout: float = 400) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def load(out: Path, phase: str) -> list[dict]:
    return [json.loads((out / f"{phase}-rank{rank}.json").read_text()) for rank in range(2)]


def check_runs(out: Path, steps: int) -> dict[str, list[dict]]:
    """Compressed buckets were sent, both ranks end with the same parameters, and the
    interrupted-then-resumed run ends where the uninterrupted one did, with the same losses."""
    runs = {phase: load(out, phase) for phase in PHASES}
    for phase, ranks in runs.items():
        assert ranks[0]["digest"] == ranks[1]["digest"], phase
        for record in ranks:
            assert record["stats"]["compressed_buckets"] > 0, (phase, record["stats"])
            assert record["stats"]["sent_bytes"] < record["stats"]["dense_bytes"] / 2, (phase, record["stats"])
    for rank in range(2):
        full, first, resumed = (runs[phase][rank] for phase in PHASES)
        assert resumed["digest"] == full["digest"], rank
        assert first["digest"] != full["digest"]
        assert first["losses"] + resumed["losses"] == full["losses"], rank
        assert len(full["losses"]) == steps
        assert resumed["stats"]["steps"] == full["stats"]["steps"]
    return runs


# --- PyTorch Lightning ---------------------------------------------------------------------


def lightning(out: Path, mode: str, start_method: str, phases: str = ",".join(PHASES)) -> str:
    output = launch([sys.executable, worker("lightning_runs"), str(out), mode, start_method, phases])
    assert "holds no deepreduce state" not in output
    return output


@pytest.mark.slow
def test_lightning_hook_resumes_bit_for_bit(tmp_path):
    """Gradient mode under Lightning's ``ddp`` (it starts this worker again as rank 1)."""
    lightning(tmp_path, "gradient", "popen")
    check_runs(tmp_path, lightning_runs.EPOCHS * 8)
    # Rank 0's checkpoint holds every rank's residuals, named after the module's parameters.
    saved = torch.load(tmp_path / "ckpt-first" / "last.ckpt", weights_only=True)["deepreduce"]
    assert saved["world_size"] == 2 and [entry["rank"] for entry in saved["ranks"]] == [0, 1]
    residuals = [entry["hook"]["memory"]["residuals"] for entry in saved["ranks"]]
    assert set(residuals[0]) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert not torch.equal(residuals[0]["net.0.weight"], residuals[1]["net.0.weight"])
    # Evaluating that 2-rank checkpoint on one process needs no residuals: it is not refused.
    lightning(tmp_path, "gradient", "popen", "evaluate")
    assert json.loads((tmp_path / "evaluate.json").read_text())[0]["val_loss"] > 0


@pytest.mark.slow
def test_lightning_update_mode_resumes_bit_for_bit(tmp_path):
    """Update mode with keep_unsent: each rank's optimizer state and parameters travel in
    rank 0's checkpoint too."""
    lightning(tmp_path, "update", "popen")
    runs = check_runs(tmp_path, lightning_runs.EPOCHS * 8)
    assert runs["full"][0]["stats"]["exchanges"] == lightning_runs.EPOCHS * 8
    saved = torch.load(tmp_path / "ckpt-first" / "last.ckpt", weights_only=True)["deepreduce"]
    first, second = saved["ranks"]
    assert first["mode"] == "update" and len(first["optimizers"]) == 1
    # keep_unsent: between exchanges each rank holds its own unsent update in its parameters.
    assert not torch.equal(first["parameters"]["net.0.weight"], second["parameters"]["net.0.weight"])


@pytest.mark.slow
def test_lightning_recommended_adam_setting_resumes_bit_for_bit(tmp_path):
    """README's recommended Adam(W) setting under Lightning: LocalAdamW's tracked noise
    (its extra state), densities that follow a schedule (read by the exchange count) and
    the packed small tensors all resume bit for bit."""
    lightning(tmp_path, "update-adam", "popen")
    runs = check_runs(tmp_path, lightning_runs.STEPS)
    assert runs["full"][0]["stats"]["exchanges"] == lightning_runs.STEPS
    saved = torch.load(tmp_path / "ckpt-first" / "last.ckpt", weights_only=True)["deepreduce"]
    state = saved["ranks"][0]["optimizers"][0]["state"]
    assert all("error_sq" in entry for entry in state.values()), "LocalAdamW(noise='tracked') state not saved"


@pytest.mark.slow
def test_lightning_hook_under_ddp_spawn(tmp_path):
    """``ddp_spawn``: the strategy and its state pickle into the workers, which compress,
    agree and checkpoint every rank's state; the main process learns rank 0's counters
    (it trained nothing itself). One fit: resuming runs the same code as under ``ddp``."""
    lightning(tmp_path, "gradient", "spawn", "full")
    ranks = load(tmp_path, "full")
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["stats"]["compressed_buckets"] == lightning_runs.EPOCHS * 8 - 2  # start_iter=2
    main = json.loads((tmp_path / "full-main.json").read_text())
    assert main["stats"] == ranks[0]["stats"] and main["digest"] == ranks[0]["digest"]
    saved = torch.load(tmp_path / "ckpt-full" / "last.ckpt", weights_only=True)["deepreduce"]
    assert [entry["rank"] for entry in saved["ranks"]] == [0, 1]


# --- Hugging Face Trainer ------------------------------------------------------------------


def torchrun_transformers(out: Path, mode: str) -> str:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   worker("transformers_runs"), str(out), mode])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_transformers_trainer_resumes_bit_for_bit(tmp_path, mode):
    output = torchrun_transformers(tmp_path, mode)
    runs = check_runs(tmp_path, transformers_runs.STEPS)
    assert {r["ddp"] for ranks in runs.values() for r in ranks} == {"DistributedDataParallel"}
    checkpoint = tmp_path / "first" / f"checkpoint-{transformers_runs.STOP}"
    assert {p.name for p in checkpoint.glob("deepreduce-*")} == {"deepreduce-rank0.pt", "deepreduce-rank1.pt"}
    # The control: the same checkpoint without the deepreduce files resumes with empty
    # residuals (a warning says so) and ends elsewhere.
    assert "no deepreduce state found" in output
    stateless = load(tmp_path, "stateless")
    assert stateless[0]["digest"] == stateless[1]["digest"] != runs["full"][0]["digest"]


# --- in-process: options, pickling, errors ---------------------------------------------------


def test_lightning_strategy_checks_options_and_pickles():
    from deepreduce.integrations.lightning import DeepReduceStrategy

    strategy = DeepReduceStrategy(dr.DeepReduceState(compressor="topk:0.02/eliasfano/fp16", start_iter=3))
    assert strategy.mode == "gradient" and strategy.stats()["steps"] == 0
    copy = pickle.loads(pickle.dumps(strategy))  # what ddp_spawn does
    assert copy.state.describe() == strategy.state.describe()
    assert DeepReduceStrategy("topk:0.1/raw/raw").state.compressor.spec == dr.Compressor.from_spec("topk:0.1/raw/raw").spec
    update = DeepReduceStrategy(update={"compressor": "topk:0.04/eliasfano/uniform:bits=1", "keep_unsent": True})
    assert update.mode == "update" and update.state is None
    pickle.loads(pickle.dumps(update))
    with pytest.raises(dr.ConfigError, match="ddp_comm_hook"):
        DeepReduceStrategy(ddp_comm_hook=dr.deepreduce_hook)
    with pytest.raises(dr.ConfigError, match="not both"):
        DeepReduceStrategy("topk:0.01/raw/raw", update={})
    with pytest.raises(dr.ConfigError, match="unknown update-mode options"):
        DeepReduceStrategy(update={"local_step": 2})
    with pytest.raises(dr.ConfigError):
        DeepReduceStrategy(update={"compressor": "topk:2/raw/raw"})
    # every option is checked as UpdateSync checks it, before any worker starts
    for bad, message in (({"small_compressor": "topk:0.1/nosuch/fp16"}, "small_compressor: unknown index codec"),
                         ({"local_steps": 0}, "local_steps must be a positive int"),
                         ({"outer_lr": -1}, "outer_lr must be > 0"),
                         ({"density_schedule": 5}, "density_schedule must be a function"),
                         ({"keep_unsent": True, "overlap": True}, "cannot be combined"),
                         ({"granularity": "layer"}, "granularity must be one of")):
        with pytest.raises(dr.ConfigError, match=message):
            DeepReduceStrategy(update=bad)
    assert DeepReduceStrategy("auto").state.describe()["compressor"] == "auto"  # the gradient hook plans per bucket
    with pytest.raises(dr.ConfigError, match="'auto' is for the gradient hook"):
        DeepReduceStrategy(update={"compressor": "auto"})
    with pytest.raises(dr.ConfigError, match="DeepReduceState"):
        DeepReduceStrategy(state=0.01)
    # a keyword neither DDPStrategy nor DDP takes fails here, not in every worker's DDP(...)
    with pytest.raises(dr.ConfigError, match=r"compressor= is not an option of DDPStrategy or DistributedDataParallel; "
                                             r"compression options go in state="):
        DeepReduceStrategy(compressor="topk:0.01/eliasfano/fp16")
    assert DeepReduceStrategy("topk:0.1/raw/raw", find_unused_parameters=True, process_group_backend="gloo", static_graph=False)


def test_transformers_callback_checks_its_trainer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from deepreduce.integrations.transformers import DeepReduceCallback

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    with pytest.raises(dr.ConfigError, match="Trainer first"):
        DeepReduceCallback("topk:0.01/eliasfano/fp16")
    callback = DeepReduceCallback(trainer, "topk:0.01/eliasfano/fp16")
    assert callback in trainer.callback_handler.callbacks and callback.mode == "gradient"
    with pytest.raises(dr.ConfigError, match="already has"):
        DeepReduceCallback(trainer)
    with pytest.raises(dr.ConfigError, match="unknown update-mode options"):
        DeepReduceCallback(Trainer(model=model, args=trainer.args), update={"ratio": 0.1})


def test_checkpoint_entries_are_checked():
    from deepreduce.integrations import _common

    state = dr.DeepReduceState(compressor="topk:0.1/raw/raw")
    entry = _common.capture(state, None, [], rank=1, world_size=2, step=5)
    _common.check_entry(entry, 1, 2, "gradient", "here")
    for args, match in [((1, 4, "gradient"), "saved by 2 ranks, resumed by 4"), ((0, 2, "gradient"), "rank 1's"),
                        ((1, 2, "update"), "gradient mode, resumed in update mode")]:
        with pytest.raises(ValueError, match=match):
            _common.check_entry(entry, *args, "here")
    with pytest.raises(ValueError, match="not a deepreduce integration state"):
        _common.check_entry({"format": 99}, 0, 1, "gradient", "here")


@pytest.mark.parametrize("module, extra, framework", [("lightning", "lightning", ("pytorch_lightning", "lightning")),
                                                      ("transformers", "transformers", ("transformers",))])
def test_missing_framework_names_the_extra(monkeypatch, module, extra, framework):
    """Without the framework the import fails with the pip extra to install."""
    for name in list(sys.modules):
        if name.split(".")[0] in framework or name == f"deepreduce.integrations.{module}":
            monkeypatch.delitem(sys.modules, name)
    for name in framework:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail, as when not installed
    with pytest.raises(ImportError, match=rf"pip install 'deepreduce\[{extra}\]'"):
        __import__(f"deepreduce.integrations.{module}")
    import deepreduce.integrations  # the package itself imports no framework

    assert deepreduce.integrations.__doc__

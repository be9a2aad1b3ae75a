"""Horovod front end: DistributedOptimizer semantics (in process, no Horovod needed), and
under ``horovodrun --gloo``: training with bitwise-identical parameters across ranks (and
the same parameters as the mpi4py example), the dense fallback and the configuration
check. The horovodrun fixture (tests/conftest.py) builds Horovod when it is missing.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import deepreduce as dr
import deepreduce.horovod
from helpers import SoloTransport
from launching import ROOT, horovod_run, mpi_skip_reason, mpirun, worker
from workers.models import backward, tiny_model


def wrap(model: torch.nn.Module, **kwargs) -> torch.optim.Optimizer:
    kwargs.setdefault("compressor", dr.Compressor(ratio=0.05))
    kwargs.setdefault("min_numel", 100)
    return deepreduce.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters(),
        transport=SoloTransport(), **kwargs,
    )


# --- DistributedOptimizer semantics, in process ------------------------------------------------


def test_wrapped_optimizer_keeps_its_class_and_steps_with_decoded_gradients():
    model = tiny_model()
    optimizer = wrap(model)
    assert isinstance(optimizer, torch.optim.SGD)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    reference = tiny_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ref_compressor = dr.Compressor(ratio=0.05)
    residual: dict[str, torch.Tensor] = {}
    for step in range(3):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        scheduler.step()
        # the same step by hand: compress with error feedback, decode, plain SGD
        ref_optimizer.zero_grad()
        backward(reference, step)
        for name, p in reference.named_parameters():
            if p.numel() < 100:
                continue
            compensated = p.grad.reshape(-1) + residual.get(name, torch.zeros(p.numel()))
            sent = ref_compressor.compress_detailed(compensated, step=step, key=name).sent
            residual[name] = compensated - sent.to_dense()
            p.grad = sent.to_dense().reshape(p.shape)
        ref_optimizer.step()
        for group in ref_optimizer.param_groups:
            group["lr"] *= 0.5
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), (step, name)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    stats = optimizer.stats()
    assert stats["steps"] == 3 and stats["sent_bytes"] < stats["dense_bytes"]
    assert optimizer.deepreduce_state_dict()["step"] == 3


def test_backward_passes_per_step_accumulates_and_limits():
    model = tiny_model()
    optimizer = wrap(model, backward_passes_per_step=2)
    backward(model, 0)
    backward(model, 1)
    with pytest.raises(RuntimeError, match="computed 3 times before step\\(\\), more than backward_passes_per_step=2"):
        backward(model, 2)
    optimizer.zero_grad()
    backward(model, 0)
    backward(model, 1)
    accumulated = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    # the exchange saw the sum of both passes: exact for the uncompressed bias
    assert torch.equal(model[2].bias.grad, accumulated["2.bias"])
    optimizer.zero_grad()
    backward(model, 3)
    backward(model, 4)  # the counters restart after step()
    optimizer.step()
    assert optimizer.stats()["steps"] == 2


def test_synchronize_then_skip_synchronize_exchanges_once():
    model = tiny_model()
    optimizer = wrap(model)
    backward(model)
    optimizer.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with optimizer.skip_synchronize():
        optimizer.step()
    assert optimizer.stats()["steps"] == 1
    optimizer.zero_grad()
    backward(model)
    optimizer.synchronize()
    with pytest.warns(UserWarning, match="already averaged"):
        optimizer.step()
    assert optimizer.stats()["steps"] == 2


def test_distributed_optimizer_rejects_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="backward_passes_per_step must be a positive int"):
        wrap(model, backward_passes_per_step=0)
    with pytest.raises(ValueError, match="op must be 'average' or 'sum'"):
        wrap(model, op="max")
    with pytest.raises(TypeError, match="already a deepreduce DistributedOptimizer"):
        deepreduce.horovod.DistributedOptimizer(wrap(model), model.named_parameters(), transport=SoloTransport())
    with pytest.raises(ValueError, match="lacks 2 of the optimizer's parameters"):
        deepreduce.horovod.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters())[:2], transport=SoloTransport())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        deepreduce.horovod.DistributedOptimizer(model, model.named_parameters(), transport=SoloTransport())


def test_without_transport_it_needs_horovod():
    model = tiny_model()
    if importlib.util.find_spec("horovod") is None:
        with pytest.raises(ImportError, match="launch/install-horovod.sh"):
            deepreduce.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    else:
        with pytest.raises(RuntimeError, match="hvd.init\\(\\)"):
            deepreduce.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())


def rank0_json(proc) -> dict:
    # horovodrun prefixes every line with "[rank]<stdout>:"
    lines = [line.split(":", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[0]<stdout>:{")]
    assert lines, proc.stdout
    return json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("passes", [1, 2])
def test_horovod_training_keeps_parameters_identical(horovodrun, passes):
    args = ["--json", "--steps", "30", "--backward-passes", str(passes)]
    result = rank0_json(horovod_run(horovodrun, 2, str(ROOT / "launch" / "horovod_example.py"), *args))
    assert result["agree"] and len(result["digests"]) == 2 and len(set(result["digests"])) == 1
    assert result["losses"][-1] < 0.25 * result["losses"][0]
    assert result["stats"]["steps"] == 30
    if passes == 1 and mpi_skip_reason() is None:
        # Same model, data and compressor over MPI: the very same parameters, bit for bit.
        proc = mpirun(2, str(ROOT / "launch" / "mpi_example.py"), "--json", "--steps", "30")
        assert json.loads(proc.stdout.strip().splitlines()[-1])["digests"] == result["digests"]


@pytest.mark.slow
def test_horovod_transport_dense_fallback_and_mismatch(horovodrun):
    proc = horovod_run(horovodrun, 2, worker("horovod_checks"))
    assert proc.stdout.count("dense allreduce ok") == 2, proc.stdout
    assert proc.stdout.count("resume broadcast ok, exchanges 0") == 2, proc.stdout
    assert proc.stdout.count("ConfigError") == 2, proc.stdout
    assert "min_numel: rank 0=100, rank 1=200" in proc.stdout

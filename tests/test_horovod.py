"""Horovod backend: DistributedOptimizer semantics (in process and over MPI, no Horovod
needed), and under ``horovodrun --gloo``: payloads byte-identical to the torch.distributed
and direct paths, and training with bitwise-identical parameters across ranks.

Horovod 0.28.1 must be built from source with a C++17 patch (launch/install-horovod.sh).
When it is not installed, the first ``horovodrun`` test builds and installs it into this
environment (122 s measured on 2 idle cores; the wheel is cached, so a new environment on
the same machine installs it in seconds). The tests skip, saying why, only where Horovod
cannot be installed (no g++, or the package index is out of reach), or when
``DEEPREDUCE_TEST_HOROVOD=0`` asks not to build it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepreduce as dr
import deepreduce.horovod
from deepreduce.comm import Transport

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
BUILD_ENV = "DEEPREDUCE_TEST_HOROVOD"


def _load_test_mpi():
    spec = importlib.util.spec_from_file_location("_deepreduce_test_mpi", THIS.parent / "test_mpi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shared = _load_test_mpi()
needs_mpi = shared.needs_mpi


class SoloTransport(Transport):
    rank = 0
    world_size = 1

    def allgather_varlen(self, payload: torch.Tensor) -> list[torch.Tensor]:
        return [payload.clone()]

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.ReLU(), torch.nn.Linear(50, 3))


def wrap(model: torch.nn.Module, **kwargs) -> torch.optim.Optimizer:
    kwargs.setdefault("compressor", dr.Compressor(ratio=0.05))
    kwargs.setdefault("min_numel", 100)
    return deepreduce.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters(),
        transport=SoloTransport(), **kwargs,
    )


def backward(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 40, generator=gen), torch.randn(16, 3, generator=gen)
    torch.nn.functional.mse_loss(model(x), y).backward()


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
        for bucket, (name, p) in enumerate(reference.named_parameters()):
            if p.numel() < 100:
                continue
            compensated = p.grad.reshape(-1) + residual.get(name, torch.zeros(p.numel()))
            sent = ref_compressor.encode(compensated, step=step, bucket=bucket).sent
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
    assert optimizer.deepreduce_state_dict()["steps"] == 3


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


@needs_mpi
@pytest.mark.slow
def test_distributed_optimizer_over_mpi_keeps_ranks_identical(tmp_path):
    """The optimizer's logic with 3 real ranks, carried by MPI instead of Horovod."""
    proc = shared.mpirun(3, str(THIS), "optimizer-mpi")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["digests"]) == 3 and len(set(result["digests"])) == 1
    assert result["losses"][-1] < 0.5 * result["losses"][0]


# --- under horovodrun ---------------------------------------------------------------------------


def _horovod_problem() -> str | None:
    """Why horovodrun cannot be used as installed, or None when it can (or must be built)."""
    try:
        importlib.invalidate_caches()
        import horovod.torch as hvd
    except ImportError as exc:
        if importlib.util.find_spec("horovod") is None:
            return None
        return f"horovod is installed but does not import ({exc}); rebuild it with launch/install-horovod.sh"
    if not hvd.gloo_built():
        return "horovod was built without Gloo; rebuild it with launch/install-horovod.sh"
    return None


@pytest.fixture(scope="session")
def horovodrun() -> list[str]:
    """The horovodrun command, building Horovod first when it is not installed."""
    problem = _horovod_problem()
    assert problem is None, problem
    if importlib.util.find_spec("horovod") is None:
        if os.environ.get(BUILD_ENV) == "0":
            pytest.skip(f"Horovod is not installed and {BUILD_ENV}=0 asks not to build it (launch/install-horovod.sh)")
        proc = subprocess.run(["bash", str(ROOT / "launch" / "install-horovod.sh"), "--python", sys.executable],
                              cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if proc.returncode == 3:  # the script's "cannot be installed here"
            pytest.skip(f"Horovod cannot be installed here: {proc.stderr.strip()[-400:]}")
        assert proc.returncode == 0, f"install-horovod.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        problem = _horovod_problem()
        assert problem is None and importlib.util.find_spec("horovod") is not None, problem or "horovod still missing"
    launcher = Path(sys.executable).parent / "horovodrun"
    assert launcher.exists(), f"horovod is importable but {launcher} is missing"
    return [str(launcher), "--gloo", "--start-timeout", "60"]


def run_horovod(horovodrun: list[str], world: int, *args: str) -> subprocess.CompletedProcess:
    return shared.run_checked([*horovodrun, "-np", str(world), "-H", f"localhost:{world}", sys.executable, *args], timeout=300)


def rank0_json(proc: subprocess.CompletedProcess) -> dict:
    # horovodrun prefixes every line with "[rank]<stdout>:"
    lines = [line.split(":", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[0]<stdout>:{")]
    assert lines, proc.stdout
    return json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_horovod_payloads_identical_to_torch_distributed(horovodrun, tmp_path, world):
    run_horovod(horovodrun, world, str(THIS.parent / "test_mpi.py"), "payloads", "horovod", str(tmp_path / "hvd"))
    shared.torchrun_gloo(world, str(THIS.parent / "test_mpi.py"), "payloads", "torch", str(tmp_path / "gloo"))
    assert shared.check_gathered_payloads(tmp_path / "hvd", world) == shared.check_gathered_payloads(tmp_path / "gloo", world)


@pytest.mark.slow
@pytest.mark.parametrize("passes", [1, 2])
def test_horovod_training_keeps_parameters_identical(horovodrun, passes):
    args = ["--json", "--steps", "30", "--backward-passes", str(passes)]
    result = rank0_json(run_horovod(horovodrun, 2, str(ROOT / "launch" / "horovod_example.py"), *args))
    assert result["agree"] and len(result["digests"]) == 2 and len(set(result["digests"])) == 1
    assert result["losses"][-1] < 0.25 * result["losses"][0]
    assert result["stats"]["steps"] == 30
    if passes == 1 and shared.mpi_skip_reason() is None:
        # Same model, data and compressor over MPI: the very same parameters, bit for bit.
        proc = shared.mpirun(2, str(ROOT / "launch" / "mpi_example.py"), "--json", "--steps", "30")
        assert json.loads(proc.stdout.strip().splitlines()[-1])["digests"] == result["digests"]


@pytest.mark.slow
def test_horovod_transport_dense_fallback_and_mismatch(horovodrun):
    proc = run_horovod(horovodrun, 2, str(THIS), "horovod-checks")
    assert proc.stdout.count("dense allreduce ok") == 2, proc.stdout
    assert proc.stdout.count("ConfigError") == 2, proc.stdout
    assert "min_numel: rank 0=100, rank 1=200" in proc.stdout


# --- worker side ------------------------------------------------------------------------------------


def _worker_optimizer_mpi() -> None:
    import hashlib

    from deepreduce.comm.mpi import MPITransport

    transport = MPITransport()
    rank = transport.rank
    model = tiny_model()
    optimizer = deepreduce.horovod.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), model.named_parameters(),
        compressor=dr.Compressor.from_spec("randomk:0.1/eliasfano/fp16"), backward_passes_per_step=2,
        min_numel=100, transport=transport,
    )
    losses = []
    for step in range(25):
        optimizer.zero_grad()
        total = 0.0
        for micro in range(2):
            gen = torch.Generator().manual_seed(rank * 100 + micro)
            x = torch.randn(32, 40, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), x[:, :3]) / 2
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(sum(transport.comm.allgather(total)) / transport.world_size)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    digests = transport.comm.allgather(digest)
    if rank == 0:
        print(json.dumps({"digests": digests, "losses": losses}))


def _worker_horovod_checks() -> None:
    import horovod.torch as hvd

    from deepreduce.comm.horovod import HorovodTransport

    hvd.init()
    transport = HorovodTransport()
    rank = transport.rank
    tensor = torch.full((5,), float(rank + 1))
    transport.allreduce_(tensor)
    assert torch.equal(tensor, torch.full((5,), 3.0)), tensor
    transport.barrier()
    print("dense allreduce ok", flush=True)
    model = tiny_model()
    optimizer = deepreduce.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), min_numel=100 * (rank + 1))
    backward(model, rank)
    try:
        optimizer.step()
    except dr.ConfigError as exc:
        print(f"ConfigError on rank {rank}: {exc}", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"optimizer-mpi": _worker_optimizer_mpi, "horovod-checks": _worker_horovod_checks}[sys.argv[1]]()

"""mpi4py backend: transport, compressed averaging, the mpirun example, and the
payload equivalence with torch.distributed (gloo: this file's own pad-to-max gather and
the library's TorchTransport).

Multi-rank tests launch ``mpiexec -n W python tests/test_mpi.py <mode> ...`` (this file
is also the worker) and compare what the ranks wrote with what the test computes in
process with ``Compressor.encode``. They need mpi4py and MPICH (part of the ``test``
extra; ``launch/install-mpi.sh`` installs them elsewhere) and skip, saying so, without.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deepreduce as dr
from deepreduce.comm import Transport
from deepreduce.exchange import GradientExchange, frame, unframe

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

# (spec, numel): every index/value codec family the core ships, random and exact selection.
PAYLOAD_CASES = [
    ("topk:0.05/eliasfano/fp16", 5000),
    ("randomk:0.1/rle/raw", 3001),
    ("topk:0.01/zstd/bf16", 20000),
    ("topk:0.2/raw/zstd", 777),
]
PAYLOAD_STEPS = (0, 3)
SEED = 7


def case_gradient(rank: int, case: int, step: int, numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * rank + 100 * case + step)
    return torch.randn(numel, generator=gen) * (1 + case)


def local_payloads(rank: int) -> list[torch.Tensor]:
    """What ``rank`` sends, computed directly with ``Compressor.encode`` (the reference)."""
    out = []
    for case, (spec, numel) in enumerate(PAYLOAD_CASES):
        compressor = dr.Compressor.from_spec(spec, seed=SEED)
        for step in PAYLOAD_STEPS:
            out.append(compressor.encode(case_gradient(rank, case, step, numel), step=step, bucket=case).payload)
    return out


# --- a tiny model with fixed gradients, for exact averaging checks ---------------------------

MODEL_SHAPES = [("embed.weight", (40, 50)), ("proj.weight", (30, 60)), ("proj.bias", (30,)), ("scale", (7,))]
EXCHANGE_SPEC = "topk:0.03/eliasfano/fp16"
EXCHANGE_MIN_NUMEL = 100


def model_gradients(rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(50_000 + 1000 * rank + step)
    return {name: torch.randn(shape, generator=gen) for name, shape in MODEL_SHAPES}


def make_parameters() -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, torch.nn.Parameter(torch.zeros(shape))) for name, shape in MODEL_SHAPES]


def expected_averages(world: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """The averaged gradients of each step, replayed in process: the sender keeps
    residual = compensated - sent, receivers sum what they decode in rank order."""
    compressor = {r: dr.Compressor.from_spec(EXCHANGE_SPEC) for r in range(world)}
    residual: dict[tuple[int, str], torch.Tensor] = {}
    results = []
    for step in range(steps):
        contributions: dict[str, list[torch.Tensor]] = {name: [] for name, _ in MODEL_SHAPES}
        for rank in range(world):
            grads = model_gradients(rank, step)
            for bucket, (name, shape) in enumerate(MODEL_SHAPES):
                flat = grads[name].reshape(-1)
                if flat.numel() < EXCHANGE_MIN_NUMEL:
                    contributions[name].append(flat)
                    continue
                compensated = flat + residual.get((rank, name), torch.zeros_like(flat))
                sent = compressor[rank].encode(compensated, step=step, bucket=bucket).sent
                residual[(rank, name)] = compensated - sent.to_dense(flat.dtype)
                contributions[name].append(sent.to_dense(flat.dtype))
        averaged = {}
        for name, shape in MODEL_SHAPES:
            total = torch.zeros(contributions[name][0].numel())
            for part in contributions[name]:
                total += part
            averaged[name] = (total / world).reshape(shape)
        results.append(averaged)
    return results


# --- launching ----------------------------------------------------------------------------------


def find_mpiexec() -> str | None:
    """The mpiexec next to this interpreter (the ``mpich`` wheel puts it there), else on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def mpi_skip_reason() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -c constraints.txt mpi4py mpich, or launch/install-mpi.sh)"
    if find_mpiexec() is None:
        return "mpi4py is installed but no mpiexec was found (pip install -c constraints.txt mpich)"
    return None


needs_mpi = pytest.mark.skipif(mpi_skip_reason() is not None, reason=str(mpi_skip_reason()))


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_checked(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@functools.lru_cache(maxsize=None)
def mpiexec_flags() -> tuple[str, ...]:
    """MPICH (the wheel) needs none; Open MPI refuses root and more ranks than cores without these."""
    version = subprocess.run([find_mpiexec(), "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Open MPI" not in version and "OpenRTE" not in version:
        return ()
    return ("--oversubscribe",) + (("--allow-run-as-root",) if os.geteuid() == 0 else ())


def mpirun(world: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_checked([find_mpiexec(), *mpiexec_flags(), "-n", str(world), sys.executable, *args], timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_gloo(world: int, *args: str, timeout: float = 180) -> None:
    """Start ``world`` processes of this file joined in a gloo process group."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = worker_env() | {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"gloo rank {rank} failed ({proc.returncode}):\n{out}"


def check_gathered_payloads(out_dir: Path, world: int) -> dict[str, bytes]:
    """Every rank received every rank's payload, byte-identical to ``Compressor.encode``."""
    reference = {src: local_payloads(src) for src in range(world)}
    first: dict[str, bytes] | None = None
    for rank in range(world):
        with np.load(out_dir / f"rank{rank}.npz") as data:
            got = {key: data[key].tobytes() for key in data.files}
        assert len(got) == world * len(reference[0]) + world
        for src in range(world):
            for i, payload in enumerate(reference[src]):
                assert got[f"p{i}_from{src}"] == payload.numpy().tobytes(), f"rank {rank}: payload {i} of rank {src} differs"
            # allgather_bytes with a different length per rank, rank 0's empty
            assert got[f"bytes_from{src}"] == bytes(range(3 * src))
        first = first or got
        assert got == first
    return first


# --- in-process tests (no launcher) ---------------------------------------------------------------


class SoloTransport(Transport):
    """A world of one rank."""

    rank = 0
    world_size = 1

    def allgather_varlen(self, payload: torch.Tensor) -> list[torch.Tensor]:
        return [payload.clone()]

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


def test_transports_are_registered_by_name():
    from deepreduce.comm import transport_class
    from deepreduce.comm.horovod import HorovodTransport
    from deepreduce.comm.mpi import MPITransport

    assert transport_class("mpi") is MPITransport
    assert transport_class("horovod") is HorovodTransport


@needs_mpi
def test_mpi_transport_rejects_bad_payloads():
    from deepreduce.comm.mpi import MPITransport

    transport = object.__new__(MPITransport)  # validation happens before any MPI call
    with pytest.raises(ValueError, match="1-D uint8 tensor, got torch.float32"):
        transport.allgather_varlen(torch.zeros(3))
    with pytest.raises(TypeError, match="got bytes"):
        transport.allgather_varlen(b"abc")


def test_frame_round_trip_and_alignment():
    entries = [torch.arange(5, dtype=torch.uint8), None, torch.empty(0, dtype=torch.uint8), torch.full((9,), 7, dtype=torch.uint8)]
    message = frame(entries)
    assert message.numel() == 8 * 5 + 8 + 0 + 16
    back = unframe(message, len(entries))
    assert back[1] is None
    for sent, got in zip(entries, back):
        if sent is not None:
            assert torch.equal(sent, got)
    assert [e.storage_offset() % 8 for e in back if e is not None] == [0, 0, 0]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m[:4], "cannot hold the entry count"),
        (lambda m: m, "carries 4 entries, expected 3"),
        (lambda m: m[:-8], "add up to"),
        (lambda m: torch.cat([m[:8], torch.tensor([-5], dtype=torch.int64).view(torch.uint8), m[16:]]), "negative entry size"),
    ],
)
def test_unframe_rejects_malformed_messages(mutate, match):
    message = frame([torch.arange(5, dtype=torch.uint8), None, torch.ones(9, dtype=torch.uint8), torch.ones(3, dtype=torch.uint8)])
    expected = 3 if "expected 3" in match else 4
    with pytest.raises(dr.DecodeError, match=match):
        unframe(mutate(message), expected)


def test_exchange_single_rank_matches_replay():
    params = make_parameters()
    exchange = GradientExchange(SoloTransport(), dr.Compressor.from_spec(EXCHANGE_SPEC), params, min_numel=EXCHANGE_MIN_NUMEL)
    expected = expected_averages(1, 3)
    for step in range(3):
        for name, param in params:
            param.grad = model_gradients(0, step)[name].clone()
        exchange.synchronize()
        for name, param in params:
            assert torch.equal(param.grad, expected[step][name]), (step, name)
    stats = exchange.stats.as_dict()
    assert stats["steps"] == 3 and stats["ratio"] > 5


def test_exchange_rejects_bad_arguments():
    params = make_parameters()
    with pytest.raises(TypeError, match="Transport"):
        GradientExchange(object(), dr.Compressor(), params)
    with pytest.raises(TypeError, match="Compressor"):
        GradientExchange(SoloTransport(), "topk", params)
    with pytest.raises(ValueError, match="repeated: a"):
        GradientExchange(SoloTransport(), dr.Compressor(), [("a", params[0][1]), ("a", params[1][1])])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        GradientExchange(SoloTransport(), dr.Compressor(), [("i", torch.zeros(3, dtype=torch.int64))])


def test_exchange_leaves_unused_parameters_alone():
    params = make_parameters()
    exchange = GradientExchange(SoloTransport(), dr.Compressor(ratio=0.1), params, min_numel=EXCHANGE_MIN_NUMEL)
    params[0][1].grad = torch.ones(MODEL_SHAPES[0][1])
    exchange.synchronize()
    assert params[0][1].grad is not None
    assert all(p.grad is None for _, p in params[1:])


# --- multi-rank tests ----------------------------------------------------------------------------------


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_mpi_payloads_identical_to_torch_distributed(tmp_path, world):
    mpi_dir, gloo_dir = tmp_path / "mpi", tmp_path / "gloo"
    mpirun(world, str(THIS), "payloads", "mpi", str(mpi_dir))
    torchrun_gloo(world, str(THIS), "payloads", "torch", str(gloo_dir))
    via_mpi = check_gathered_payloads(mpi_dir, world)
    via_gloo = check_gathered_payloads(gloo_dir, world)
    assert via_mpi == via_gloo


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_mpi_averaging_is_exact_and_identical_across_ranks(tmp_path, world):
    mpirun(world, str(THIS), "average", str(tmp_path))
    # a rank with a different compressor: every rank raises ConfigError naming the difference
    specs = ", ".join(f"rank {r}='{EXCHANGE_SPEC if r != 1 else 'topk:0.05/eliasfano/fp16'}'" for r in range(world))
    for rank in range(world):
        error = (tmp_path / f"mismatch{rank}.txt").read_text()
        assert error.startswith(f"ConfigError: ranks disagree on the compressed gradient exchange: compressor: {specs}; fingerprint: ")
    expected = expected_averages(world, 3)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(3):
            for name, _ in MODEL_SHAPES:
                assert torch.equal(got["exchange"][step][name], expected[step][name]), (rank, step, name)
        # allreduce_compressed: one tensor, error feedback, two steps
        for got_step, expected_step in zip(got["allreduce"], allreduce_reference(world), strict=True):
            assert torch.equal(got_step, expected_step), rank
        assert got["sent_bytes"] > 0
        factor = world * (world + 1) // 2
        assert torch.equal(got["dense"][0], torch.arange(6, dtype=torch.float32) * factor)
        assert got["dense"][1].dtype == torch.bfloat16
        assert torch.equal(got["dense"][1], (torch.arange(0, 6, 2, dtype=torch.float32) * factor).to(torch.bfloat16))


def allreduce_reference(world: int) -> list[torch.Tensor]:
    compressor = {r: dr.Compressor(ratio=0.02, index="rle", value="raw") for r in range(world)}
    residual = {r: torch.zeros(4096) for r in range(world)}
    out = []
    for step in range(2):
        total = torch.zeros(4096)
        for rank in range(world):
            compensated = case_gradient(rank, 9, step, 4096) + residual[rank]
            sent = compressor[rank].encode(compensated, step=step, bucket=5).sent
            residual[rank] = compensated - sent.to_dense()
            total += sent.to_dense()
        out.append((total / world).reshape(64, 64))
    return out


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("world, spec", [(2, "topk:0.05/eliasfano/fp16"), (3, "randomk:0.1/rle/bf16")])
def test_mpi_example_trains_with_identical_parameters(world, spec):
    proc = mpirun(world, str(ROOT / "launch" / "mpi_example.py"), "--json", "--spec", spec, "--steps", "30")
    *text, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["world_size"] == world
    assert result["agree"] and len(set(result["digests"])) == 1 and len(result["digests"]) == world
    assert f"parameters agree on all {world} ranks (sha256 {result['digests'][0][:16]})" in text
    assert result["losses"][-1] < 0.25 * result["losses"][0]
    assert result["stats"]["ratio"] > 4


# --- worker side -------------------------------------------------------------------------------------------


def _torch_allgather_varlen(payload: torch.Tensor) -> list[torch.Tensor]:
    """The torch.distributed way on gloo: sizes, pad to the largest, one all_gather_into_tensor."""
    import torch.distributed as dist

    world = dist.get_world_size()
    sizes = torch.empty(world, dtype=torch.int64)
    dist.all_gather_into_tensor(sizes, torch.tensor([payload.numel()], dtype=torch.int64))
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    gathered = torch.empty(world * longest, dtype=torch.uint8)
    dist.all_gather_into_tensor(gathered, padded)
    return [gathered[r * longest : r * longest + int(n)] for r, n in enumerate(sizes.tolist())]


def _worker_payloads(transport_name: str, out_dir: str) -> None:
    if transport_name == "torch":
        import torch.distributed as dist

        from deepreduce.comm.torch_dist import TorchTransport, close_process_group

        port = os.environ["MASTER_PORT"]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        library = TorchTransport()

        def gather(payload: torch.Tensor) -> list[torch.Tensor]:
            # this file's own pad-to-max gather, and the library's TorchTransport, must agree
            own, theirs = _torch_allgather_varlen(payload), library.allgather_varlen(payload)
            assert [t.numpy().tobytes() for t in own] == [t.numpy().tobytes() for t in theirs]
            return own

        rank, gather_bytes, finish = dist.get_rank(), library.allgather_bytes, close_process_group
    else:
        if transport_name == "mpi":
            from deepreduce.comm.mpi import MPITransport

            transport = MPITransport()
            finish = transport.barrier
        else:
            import horovod.torch as hvd

            from deepreduce.comm.horovod import HorovodTransport

            hvd.init()
            transport = HorovodTransport()
            finish = hvd.shutdown
        rank, gather, gather_bytes = transport.rank, transport.allgather_varlen, transport.allgather_bytes
    arrays = {}
    for i, payload in enumerate(local_payloads(rank)):
        for src, got in enumerate(gather(payload)):
            arrays[f"p{i}_from{src}"] = got.numpy()
    for src, data in enumerate(gather_bytes(bytes(range(3 * rank)))):
        arrays[f"bytes_from{src}"] = np.frombuffer(data, dtype=np.uint8)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out_dir) / f"rank{rank}.npz", **arrays)
    finish()  # every rank leaves together: an exit under live gloo threads can abort


def _worker_average(out_dir: str) -> None:
    import deepreduce.mpi
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    params = make_parameters()
    averager = deepreduce.mpi.GradientAverager(params, dr.Compressor.from_spec(EXCHANGE_SPEC), min_numel=EXCHANGE_MIN_NUMEL)
    results = []
    for step in range(3):
        for name, param in params:
            param.grad = model_gradients(rank, step)[name].clone()
        averager.synchronize()
        results.append({name: param.grad.clone() for name, param in params})
    memory = deepreduce.mpi.ErrorFeedback()
    compressor = dr.Compressor(ratio=0.02, index="rle", value="raw")
    reduced = [
        deepreduce.mpi.allreduce_compressed(case_gradient(rank, 9, step, 4096).reshape(64, 64), compressor,
                                            step=step, bucket=5, memory=memory)
        for step in range(2)
    ]
    # the dense fallback, in place, for a native and a half-precision dtype
    dense32 = torch.arange(6, dtype=torch.float32) * (rank + 1)
    dense16 = (torch.arange(6, dtype=torch.float32) * (rank + 1)).to(torch.bfloat16)[::2]  # strided view
    averager.transport.allreduce_(dense32)
    averager.transport.allreduce_(dense16)
    averager.transport.barrier()
    torch.save({"exchange": results, "allreduce": reduced, "sent_bytes": averager.stats.sent_bytes,
                "dense": [dense32, dense16]}, Path(out_dir) / f"rank{rank}.pt")
    _check_mismatch(rank, Path(out_dir))


def _check_mismatch(rank: int, out_dir: Path) -> None:
    import deepreduce.mpi

    params = make_parameters()
    spec = EXCHANGE_SPEC if rank != 1 else "topk:0.05/eliasfano/fp16"
    averager = deepreduce.mpi.GradientAverager(params, dr.Compressor.from_spec(spec), min_numel=EXCHANGE_MIN_NUMEL)
    for name, param in params:
        param.grad = model_gradients(rank, 0)[name].clone()
    try:
        averager.synchronize()
    except dr.ConfigError as exc:
        (out_dir / f"mismatch{rank}.txt").write_text(f"ConfigError: {exc}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *rest = sys.argv[1:]
    {"payloads": _worker_payloads, "average": _worker_average}[mode](*rest)

"""Starting multi-process workers from tests: mpiexec, a bare gloo group, horovodrun.

Workers live in ``tests/workers/``; each rank writes what it saw to a directory the
test then compares.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def worker(name: str) -> str:
    """Path of ``tests/workers/<name>.py``."""
    path = WORKERS / f"{name}.py"
    assert path.exists(), path
    return str(path)


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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
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


def gloo_run(world: int, *args: str, timeout: float = 180) -> list[str]:
    """Start ``world`` processes (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` set) that join
    one gloo group themselves; returns their outputs."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = worker_env() | {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(port), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"gloo rank {rank} failed ({proc.returncode}):\n{out}"
    return outputs


def horovod_run(horovodrun: list[str], world: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_checked([*horovodrun, "-np", str(world), "-H", f"localhost:{world}", sys.executable, *args], timeout=timeout)

#!/usr/bin/env bash
# Installs the mpi4py backend: mpi4py plus MPICH from prebuilt wheels (no compiler,
# no system MPI, a few seconds), pinned by the repository's constraints file.
#
#   launch/install-mpi.sh [PYTHON]      # PYTHON defaults to .venv/bin/python, then python3
#
# Afterwards `mpiexec -n 2 PYTHON launch/mpi_example.py` trains a tiny model on two
# ranks. The mpiexec that runs the job must be the one of the same MPI that mpi4py
# was built against: the `mpich` wheel puts it next to PYTHON (bin/mpiexec). MPICH's
# mpiexec runs as root and with more ranks than cores (-n 3 on 2 cores) with no flags.
# With a system Open MPI instead (apt-get install libopenmpi-dev openmpi-bin, then
# pip install mpi4py without mpich), root needs mpirun --allow-run-as-root --oversubscribe.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
"$python" -m pip install -c "$root/constraints.txt" "mpi4py>=4.0" "mpich>=4.2"
"$python" - <<'PY'
from mpi4py import MPI
print(f"mpi4py {MPI.Get_library_version().splitlines()[0].strip()}")
PY

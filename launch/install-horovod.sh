#!/usr/bin/env bash
# Builds and installs Horovod 0.28.1 (its last release) for the installed torch.
#
#   launch/install-horovod.sh [--cuda] [--python PYTHON] [--cache DIR] [--no-install]
#
# Horovod 0.28.1 does not build against torch >= 2.1 as released: its CMake files ask
# for C++14 and torch's headers need C++17. This script downloads the source
# distribution, sets CMAKE_CXX_STANDARD to 17 in the two CMakeLists.txt that pin it,
# builds a wheel without build isolation (so it compiles against the torch that is
# installed, never a fresh one) and installs it. The wheel is cached per (horovod,
# torch, python, cpu|cuda): a second run installs it in seconds.
#
# CPU build (default): PyTorch ops over Gloo, no MPI, no TensorFlow/MXNet. ~2-4 min on
#   2 cores. Then: horovodrun --gloo -np 2 -H localhost:2 PYTHON launch/horovod_example.py
# --cuda: also NCCL for GPU tensors (needs nvcc and the NCCL headers/libraries, as in
#   the nvidia/cuda *-devel images; HOROVOD_NCCL_HOME is honoured). Gloo stays on for
#   CPU tensors and for horovodrun --gloo.
#
# Needs: g++ and cmake >= 3.13 (a missing cmake is installed from PyPI), torch already
# installed in PYTHON's environment (torch is installed here only with the repository's
# constraints file, which pins it, never unpinned).
#
# Environment: DEEPREDUCE_CACHE (default ~/.cache/deepreduce) holds the wheel;
# HOROVOD_BUILD_JOBS (default: number of cores) compile jobs.
set -euo pipefail

HOROVOD_VERSION=0.28.1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$root/constraints.txt"
python=""
cuda=0
install=1
cache="${DEEPREDUCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deepreduce}"

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda) cuda=1 ;;
        --python) python="$2"; shift ;;
        --cache) cache="$2"; shift ;;
        --no-install) install=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install-horovod.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
pip=("$python" -m pip)
step() { printf '[install-horovod %3ss] %s\n' "$SECONDS" "$*"; }

command -v g++ >/dev/null || { echo "install-horovod.sh: g++ not found (Debian/Ubuntu: apt-get install -y g++)" >&2; exit 1; }
if ! "$python" -c "import torch" 2>/dev/null; then
    step "torch missing in $python: installing it pinned by $constraints"
    "${pip[@]}" install -c "$constraints" torch
fi
torch_version="$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')"
py_tag="$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
variant=$([[ $cuda == 1 ]] && echo cuda || echo cpu)
wheel_dir="$cache/horovod-$HOROVOD_VERSION-torch$torch_version-$py_tag-$variant"

# Horovod's runtime dependencies and build helpers (build isolation is off).
"${pip[@]}" install -q -c "$constraints" "cloudpickle" "psutil" "pyyaml" "packaging" "setuptools" "wheel"
if ! command -v cmake >/dev/null; then
    step "cmake not found: installing it from PyPI"
    "${pip[@]}" install -q -c "$constraints" "cmake>=3.13,<4"
    export PATH="$(dirname "$("$python" -c 'import sys; print(sys.executable)')"):$PATH"
fi

shopt -s nullglob
wheels=("$wheel_dir"/horovod-"$HOROVOD_VERSION"-*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    step "downloading the horovod $HOROVOD_VERSION source distribution"
    "${pip[@]}" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    for cmakelists in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$cmakelists"
        grep -q 'set(CMAKE_CXX_STANDARD 17)' "$cmakelists" \
            || { echo "install-horovod.sh: could not set C++17 in $cmakelists" >&2; exit 1; }
    done
    step "patched CMAKE_CXX_STANDARD 14 -> 17; building (torch $torch_version, $variant)"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
    if [[ $cuda == 1 ]]; then
        command -v nvcc >/dev/null || { echo "install-horovod.sh: --cuda needs nvcc (a CUDA *-devel image)" >&2; exit 1; }
        export HOROVOD_GPU_OPERATIONS=NCCL
    else
        unset HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST
        export HOROVOD_WITHOUT_GPU=1 HOROVOD_CPU_OPERATIONS=GLOO
    fi
    export CMAKE_BUILD_PARALLEL_LEVEL="${HOROVOD_BUILD_JOBS:-$(nproc)}"
    export MAKEFLAGS="-j${CMAKE_BUILD_PARALLEL_LEVEL}"
    mkdir -p "$wheel_dir"
    "${pip[@]}" wheel -q --no-build-isolation --no-deps -w "$work/dist" "$src"
    mv "$work"/dist/horovod-"$HOROVOD_VERSION"-*.whl "$wheel_dir"/
    wheels=("$wheel_dir"/horovod-"$HOROVOD_VERSION"-*.whl)
    step "built ${wheels[0]}"
else
    step "using the cached wheel ${wheels[0]}"
fi

if [[ $install == 1 ]]; then
    "${pip[@]}" install -q -c "$constraints" --force-reinstall --no-deps "${wheels[0]}"
    "$python" - <<'PY'
import horovod.torch as hvd
print(f"horovod ready: gloo built={hvd.gloo_built()} mpi built={hvd.mpi_built()} nccl built={hvd.nccl_built()}")
PY
    step "done"
fi

#!/usr/bin/env bash
# Builds and installs Horovod 0.28.1 (its last release) for the installed torch.
#
#   launch/install-horovod.sh [--cuda] [--python PYTHON] [--cache DIR] [--no-install]
#   launch/install-horovod.sh --patch-source DIR     # only apply the source patch to DIR
#
# Horovod 0.28.1 does not build against recent torch (checked: 2.13) as released: its
# CMake files ask for C++14 and torch's headers need C++17. This script downloads the
# source distribution, sets CMAKE_CXX_STANDARD to 17 in the two CMakeLists.txt that pin
# it (and drops -g from the release flags: faster build, 1 MB wheel instead of 18 MB),
# builds a wheel without build isolation (so it compiles against the torch that is
# installed, never a fresh one) and installs it. The wheel is cached per (horovod,
# torch, python, cpu|cuda): a second run installs it in seconds.
#
# CPU build (default): PyTorch ops over Gloo, no MPI, no TensorFlow/MXNet. 122 s measured
#   on 2 idle cores (longer when the cores are busy). Then:
#   horovodrun --gloo -np 2 -H localhost:2 PYTHON launch/horovod_example.py
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
#
# Exit status: 0 installed (or built with --no-install); 2 bad arguments; 3 Horovod cannot
# be installed on this machine (no g++, or the source cannot be downloaded); anything else
# a failed build.
set -euo pipefail

HOROVOD_VERSION=0.28.1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$root/constraints.txt"
python=""
cuda=0
install=1
patch_only=""
cache="${DEEPREDUCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deepreduce}"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda) cuda=1 ;;
        --python) python="$2"; shift ;;
        --cache) cache="$2"; shift ;;
        --no-install) install=0 ;;
        --patch-source) patch_only="$2"; shift ;;
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

# The source changes, each verified:
# 1. C++17 instead of C++14 in the two CMakeLists.txt that pin it (torch's headers need 17),
#    and for the CUDA kernels (C++11 there);
# 2. no -g in the RelWithDebInfo flags setup.py builds with: ~20 % less compile time and a
#    wheel a fraction of the size (debug symbols of a release build nobody debugs).
patch_source() {
    "$python" - "$1" <<'PY'
import pathlib, sys
src = pathlib.Path(sys.argv[1])
def patch(path, old, new):
    text = path.read_text()
    if old not in text:
        sys.exit(f"install-horovod.sh: {path}: expected {old!r}, not found (not a horovod 0.28.1 source tree?)")
    path.write_text(text.replace(old, new))
for name in ("CMakeLists.txt", "horovod/torch/CMakeLists.txt"):
    patch(src / name, "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)")
# Horovod's CUDA kernels (--cuda only) ask for C++11; CUDA 13's headers need C++17.
patch(src / "horovod/common/ops/cuda/CMakeLists.txt", "set(CMAKE_CUDA_STANDARD 11)", "set(CMAKE_CUDA_STANDARD 17)")
anchor = 'string(REPLACE "-O2" "-O3" CMAKE_CXX_FLAGS_RELWITHDEBINFO "${CMAKE_CXX_FLAGS_RELWITHDEBINFO}")'
no_debug_info = "".join(
    f'\nstring(REGEX REPLACE "(^| )-g( |$)" " " CMAKE_{lang}_FLAGS_RELWITHDEBINFO "${{CMAKE_{lang}_FLAGS_RELWITHDEBINFO}}")'
    for lang in ("C", "CXX")
)
patch(src / "CMakeLists.txt", anchor, anchor + no_debug_info)
PY
}

if [[ -n "$patch_only" ]]; then
    patch_source "$patch_only"
    step "patched $patch_only"
    exit 0
fi

command -v g++ >/dev/null || { echo "install-horovod.sh: g++ not found (Debian/Ubuntu: apt-get install -y g++)" >&2; exit 3; }
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
    "${pip[@]}" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION" \
        || { echo "install-horovod.sh: cannot download the horovod $HOROVOD_VERSION source distribution from the package index" >&2; exit 3; }
    tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    patch_source "$src"
    step "patched CMAKE_CXX_STANDARD 14 -> 17, no debug info; building (torch $torch_version, $variant)"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
    if [[ $cuda == 1 ]]; then
        command -v nvcc >/dev/null || { echo "install-horovod.sh: --cuda needs nvcc (a CUDA *-devel image)" >&2; exit 1; }
        export HOROVOD_GPU_OPERATIONS=NCCL
    else
        unset HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST
        export HOROVOD_CPU_OPERATIONS=GLOO
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

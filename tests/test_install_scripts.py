"""The install scripts in launch/ (the same ones the docker images run).

Fast checks always run: syntax, torch always pinned by constraints.txt, the Horovod
source patch on the real 0.28.1 source distribution (downloaded, 5 s) and on broken
trees, install-mpi.sh itself, and what the optional extras resolve to. The full Horovod
build runs in tests/test_horovod.py, where Horovod is not yet installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # installs packages


ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("install-*.sh"))
HOROVOD_SCRIPT = LAUNCH / "install-horovod.sh"
NETWORK_ERRORS = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|Read timed out")


def run(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def test_scripts_exist_are_executable_and_parse():
    names = {path.name for path in SCRIPTS}
    assert {"install-mpi.sh", "install-horovod.sh"} <= names
    for path in SCRIPTS:
        assert path.stat().st_mode & 0o111, f"{path.name} is not executable"
        assert path.read_text().startswith("#!/usr/bin/env bash\n"), path.name
        assert "set -euo pipefail" in path.read_text(), f"{path.name} does not stop at the first failure"
        proc = run(["bash", "-n", str(path)])
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


def _pip_commands(text: str) -> list[str]:
    """Every pip invocation in a script (continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if re.search(r"\bpip\b.*\b(install|download|wheel)\b", line) and not line.strip().startswith("#")]


def test_every_pip_call_is_pinned_or_dependency_free():
    """An unpinned torch would pull a multi-GB CUDA build: every pip call that resolves
    dependencies goes through constraints.txt; the others take --no-deps."""
    checked = 0
    for path in SCRIPTS:
        for command in _pip_commands(path.read_text()):
            checked += 1
            assert re.search(r'-c "\$(constraints|root/constraints\.txt)"', command) or "--no-deps" in command, (
                f"{path.name}: pip call neither constrained nor --no-deps: {command}")
    assert checked >= 5


def test_install_mpi_script_installs_a_working_mpi4py():
    proc = run(["bash", str(LAUNCH / "install-mpi.sh"), sys.executable], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mpi4py MPICH Version:" in proc.stdout
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"  # the script did not move torch


def _fake_tree(root: Path, *, cxx14: bool = True, flags: bool = True) -> Path:
    src = root / "horovod-0.28.1"
    (src / "horovod" / "torch").mkdir(parents=True)
    (src / "horovod" / "common" / "ops" / "cuda").mkdir(parents=True)
    std = "14" if cxx14 else "17"
    flag_line = 'string(REPLACE "-O2" "-O3" CMAKE_CXX_FLAGS_RELWITHDEBINFO "${CMAKE_CXX_FLAGS_RELWITHDEBINFO}")\n' if flags else ""
    (src / "CMakeLists.txt").write_text(f"set(CMAKE_CXX_STANDARD {std})\n{flag_line}")
    (src / "horovod" / "torch" / "CMakeLists.txt").write_text(f"    set(CMAKE_CXX_STANDARD {std})\n")
    (src / "horovod" / "common" / "ops" / "cuda" / "CMakeLists.txt").write_text("set(CMAKE_CUDA_STANDARD 11)\n")
    return src


def test_horovod_patch_rejects_an_unexpected_tree(tmp_path):
    for name, tree in [("already17", _fake_tree(tmp_path / "a", cxx14=False)), ("noflags", _fake_tree(tmp_path / "b", flags=False))]:
        proc = run(["bash", str(HOROVOD_SCRIPT), "--patch-source", str(tree)])
        assert proc.returncode != 0, name
        assert "not found (not a horovod 0.28.1 source tree?)" in proc.stderr, (name, proc.stderr)


def test_horovod_patch_on_the_real_source_distribution(tmp_path):
    """The exact download the script makes, then the patch: C++17 everywhere it was pinned,
    no -g in the release flags, nothing else touched."""
    proc = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                "-d", str(tmp_path), "horovod==0.28.1"], timeout=300)
    if proc.returncode != 0 and NETWORK_ERRORS.search(proc.stderr):
        pytest.skip(f"the package index is not reachable: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(tmp_path / "horovod-0.28.1.tar.gz") as archive:
        archive.extractall(tmp_path / "orig", filter="data")
        archive.extractall(tmp_path / "patched", filter="data")
    src = tmp_path / "patched" / "horovod-0.28.1"
    proc = run(["bash", str(HOROVOD_SCRIPT), "--patch-source", str(src)])
    assert proc.returncode == 0, proc.stderr
    changed = {}
    for path in sorted(src.rglob("*")):
        if path.is_file():
            before = (tmp_path / "orig" / "horovod-0.28.1" / path.relative_to(src)).read_bytes()
            if before != path.read_bytes():
                changed[str(path.relative_to(src))] = path.read_text()
    assert sorted(changed) == ["CMakeLists.txt", "horovod/common/ops/cuda/CMakeLists.txt", "horovod/torch/CMakeLists.txt"]
    for text in changed.values():
        assert "CMAKE_CXX_STANDARD 14" not in text and "CMAKE_CUDA_STANDARD 11" not in text
    assert 'REGEX REPLACE "(^| )-g( |$)" " " CMAKE_CXX_FLAGS_RELWITHDEBINFO' in changed["CMakeLists.txt"]


def test_horovod_script_help_and_bad_arguments():
    proc = run(["bash", str(HOROVOD_SCRIPT), "--help"])
    assert proc.returncode == 0 and "C++17" in proc.stdout and "--cuda" in proc.stdout
    proc = run(["bash", str(HOROVOD_SCRIPT), "--bogus"])
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


def test_optional_extras_never_build_horovod_or_move_torch():
    """`pip install deepreduce[horovod,mpi]` resolves to wheels only, with torch pinned."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(req.lower().startswith("horovod") for reqs in extras.values() for req in reqs)
    proc = run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary", ":all:",
                "--no-build-isolation",
                "-c", "constraints.txt", "--report", "-", "--quiet", ".[horovod,mpi]"], timeout=600)
    if proc.returncode != 0 and NETWORK_ERRORS.search(proc.stderr):
        pytest.skip(f"the package index is not reachable: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    assert versions["torch"].split("+")[0] == "2.13.0"
    assert "horovod" not in versions
    assert {"mpi4py", "mpich", "cloudpickle", "psutil", "pyyaml"} <= set(versions)

"""The docker images are not built here (no docker engine); what they run is. Each
Dockerfile may only RUN system package installs, the README's own install command, and
launch/install-*.sh scripts that exist and that the test suite exercises, with options
those scripts accept."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(p for p in (ROOT / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
APT_PART = re.compile(r"^(apt-get update|apt-get install -y --no-install-recommends [a-z0-9.+\- ]+|rm -rf /var/lib/apt/lists/\*)$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def readme_install_command() -> str:
    """The README's test command up to (not including) running the tests."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "pip install -c constraints.txt -e '.[test]'" in line)
    return command.split(" && .venv/bin/python -m pytest")[0].strip()


def scripts_exercised_by_tests() -> set[str]:
    """Install scripts whose path a test builds to run it (``LAUNCH / "install-x.sh"``);
    a name in a comment, docstring or message does not count."""
    names = set()
    for test in [*(ROOT / "tests").glob("test_*.py"), ROOT / "tests" / "conftest.py"]:
        if test.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(test.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
                if isinstance(node.right.value, str) and re.fullmatch(r"install-[a-z0-9]+\.sh", node.right.value):
                    names.add(node.right.value)
    return names


def test_only_scripts_that_tests_run_count_as_exercised():
    assert scripts_exercised_by_tests() == {"install-mpi.sh", "install-horovod.sh"}


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_only_tested_install_steps(dockerfile):
    exercised = scripts_exercised_by_tests()
    readme_command = readme_install_command()
    scripts_run = []
    for keyword, args in instructions(dockerfile):
        if keyword != "RUN":
            continue
        if args == readme_command:
            continue
        for part in (p.strip() for p in args.split("&&")):
            if APT_PART.match(part) or re.fullmatch(r"rm -rf /tmp/[a-z0-9-]+", part):
                continue
            argv = shlex.split(part)
            script = ROOT / argv[0]
            assert argv[0].startswith("launch/install-") and script.is_file(), f"{dockerfile.name}: untested step {part!r}"
            assert script.stat().st_mode & 0o111, f"{argv[0]} is not executable"
            assert script.name in exercised, f"{dockerfile.name} runs {argv[0]}, which no test exercises"
            accepted = script.read_text()
            for option in (a for a in argv[1:] if a.startswith("--")):
                assert f"{option})" in accepted, f"{dockerfile.name}: {argv[0]} has no option {option}"
            scripts_run.append(script.name)
    assert scripts_run == ["install-mpi.sh", "install-horovod.sh"], scripts_run
    keywords = [k for k, _ in instructions(dockerfile)]
    assert ("RUN", readme_command) in instructions(dockerfile), "the image must install deepreduce with the README's command"
    assert keywords.index("COPY") < keywords.index("RUN", keywords.index("COPY")), "install steps come after COPY"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_context_and_environment(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} keeps a local .venv out of the image"
    assert ".venv/" in ignore.read_text().split()
    text = " ".join(args for _, args in instructions(dockerfile))
    assert "PATH=/opt/deepreduce/.venv/bin:$PATH" in text
    assert "pip install torch" not in text, "torch is installed only through constraints.txt"


def test_cuda_image_builds_horovod_with_nccl():
    cuda = next(p for p in DOCKERFILES if p.name == "Dockerfile.cuda")
    runs = [args for keyword, args in instructions(cuda) if keyword == "RUN"]
    assert any(args.startswith("launch/install-horovod.sh --cuda") for args in runs)
    assert any("libnccl-dev" in args for args in runs)
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in (ROOT / "launch" / "install-horovod.sh").read_text()


def test_cpu_image_takes_the_cpu_wheel_as_the_readme_says():
    """PyPI's Linux torch wheel bundles CUDA: the CPU image adds PyTorch's CPU index, and the
    README gives the same line for CPU-only machines."""
    cpu = next(p for p in DOCKERFILES if p.name == "Dockerfile.cpu")
    index = "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
    assert ("ARG", index) in instructions(cpu)
    keywords = [k for k, _ in instructions(cpu)]
    assert keywords.index("ARG") < keywords.index("RUN"), "the index must be set before pip runs"
    assert f"`{index}`" in (ROOT / "README.md").read_text()
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()

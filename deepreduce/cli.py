"""The ``deepreduce`` command (also ``python -m deepreduce``).

    deepreduce demo                       dense vs. compressed training, side by side
    deepreduce train ...                  the training entry that torchrun launches
    deepreduce codecs                     registered sparsifiers and codecs
    deepreduce bench codecs|bandwidth|convergence|soak|fuzz ...
    deepreduce --version

The commands live in :mod:`deepreduce.apps`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import traceback

# Each subcommand is a module with main(argv) -> int, imported only when used so that
# `deepreduce codecs` does not pay for matplotlib or torch.distributed.
COMMANDS = {
    "demo": ("deepreduce.apps.demo:main", "train a small model dense vs. compressed on 2 local workers"),
    "train": ("deepreduce.apps.train:main", "training entry for torchrun (single or multi-node)"),
    "codecs": ("deepreduce.apps.catalog:main", "list sparsifiers and codecs with a line each"),
}
BENCHMARKS = {
    "codecs": ("deepreduce.apps.bench.codecs:main", "bits per element, error and speed of every codec"),
    "bandwidth": ("deepreduce.apps.bench.bandwidth:main", "DDP step time on emulated links vs. built-in hooks"),
    "convergence": ("deepreduce.apps.bench.convergence:main", "validation loss and time to target per configuration"),
    "soak": ("deepreduce.apps.bench.soak:main", "long runs over links that flap, change rate and lose packets"),
    "fuzz": ("deepreduce.apps.bench.fuzz:main", "fuzz decoding, message framing and the agreement check (atheris if installed)"),
}


def _run(target: str, argv: list[str]) -> int:
    module, _, func = target.partition(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def version() -> str:
    """The installed distribution's version (``deepreduce.__version__``)."""
    try:
        return importlib.metadata.version("deepreduce")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return getattr(importlib.import_module("deepreduce"), "__version__", "unknown")


def _usage() -> str:
    rows = [(name, text) for name, (_, text) in COMMANDS.items()]
    rows += [(f"bench {name}", text) for name, (_, text) in BENCHMARKS.items()]
    rows += [("--version", "print the version")]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["usage: deepreduce <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}{text}" for name, text in rows]
    lines += ["", "`deepreduce <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        print(f"deepreduce {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if rest[:1] in (["-h"], ["--help"], ["help"]):
            width = max(map(len, BENCHMARKS)) + 2
            print("usage: deepreduce bench <benchmark> [options]\n\nbenchmarks:\n"
                  + "\n".join(f"  {name:<{width}}{text}" for name, (_, text) in BENCHMARKS.items())
                  + "\n\n`deepreduce bench <benchmark> --help` for the options of one benchmark.")
            return 0
        if not rest or rest[0] not in BENCHMARKS:
            print(f"deepreduce bench: choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        return _run(BENCHMARKS[rest[0]][0], rest[1:])
    if command not in COMMANDS:
        print(f"deepreduce: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _run(COMMANDS[command][0], rest)


def exit_distributed_process(code: int) -> None:
    """End a process that ran distributed training with ``os._exit`` once its output is
    flushed: gloo's worker threads can still hold tensors when the interpreter finalises,
    and destroying them then aborts the process ("terminate called without an active
    exception") after a run that succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    """The ``deepreduce`` command."""
    argv = sys.argv[1:]
    if argv[:1] != ["train"]:
        sys.exit(main(argv))
    try:
        code = main(argv)
    except SystemExit as stop:  # argument errors, refused checkpoints: already worded
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else 1
    except Exception:  # a failed collective, a bad payload: report, then leave without gloo's teardown
        traceback.print_exc()
        code = 1
    exit_distributed_process(code)


if __name__ == "__main__":
    entry()

"""Benchmarks: ``deepreduce bench codecs|bandwidth|convergence|soak|fuzz`` (also ``benchmarks/*.py``).

Shared plumbing: where results go, how a benchmark replaces its own section of
``benchmarks/RESULTS.md``, machine facts, timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


def default_output_dir() -> Path:
    """``benchmarks/`` of the source checkout when there is one, else ``./benchmarks``."""
    checkout = Path(__file__).resolve().parents[3] / "benchmarks"
    return checkout if checkout.is_dir() else Path.cwd() / "benchmarks"


def output_dir(given: Path | None, quick: bool = False) -> Path:
    """Where a bench writes: ``given``; for a ``--quick`` run a new temporary folder; else
    the checkout's ``benchmarks/``, said on stderr (the run replaces its section of
    RESULTS.md and its files under results/: tracked files of the checkout)."""
    if given is not None:
        return given
    if quick:
        return Path(tempfile.mkdtemp(prefix="deepreduce-bench-"))
    out = default_output_dir()
    print(f"deepreduce bench: writing into {out} (this run replaces its section of RESULTS.md and its results/ "
          "files; --out DIR writes elsewhere)", file=sys.stderr, flush=True)
    return out


def check_link_rate(parser: argparse.ArgumentParser, flag: str, rate: str, unshaped: str) -> None:
    """``parser.error`` unless ``rate`` is the word ``unshaped`` stands for or a rate tc takes."""
    if rate == unshaped:
        return
    from ..netns import parse_rate

    try:
        parse_rate(rate)
    except ValueError as error:
        parser.error(f"{flag}: {error} (or {unshaped})")


def make_console():
    """A rich console that keeps tables readable when output goes to a file or pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def progress_bar(console):
    """The benchmarks' progress bar: description, bar, done/total, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def machine_facts() -> dict[str, Any]:
    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def reproduce_command(benchmark: str, argv: list[str]) -> str:
    """The command line that reproduces a run, without its ``--out`` folder."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join(["deepreduce bench", benchmark, *kept])


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (CUDA work is synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path: Path, rows: Iterable[dict] | dict) -> None:
    """Rows (a list) or one object, indented, to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows if isinstance(rows, dict) else list(rows), indent=1) + "\n")


def update_results_section(results_md: Path, name: str, body: str) -> None:
    """Replace the ``name`` section of RESULTS.md (between its markers), or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = results_md.read_text() if results_md.exists() else "# deepreduce benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(text)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

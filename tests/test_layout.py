"""The library core never imports its applications, and the per-step work has one home."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deepreduce"
APPLICATIONS = {"apps", "cli.py", "__main__.py"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the deepreduce modules ``path`` imports (relative imports resolved)."""
    package = ".".join(("deepreduce", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("deepreduce")}


def core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in APPLICATIONS]


def test_core_never_imports_the_applications():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("deepreduce.apps"))
                 for p in core_files()}
    assert not {k: v for k, v in offenders.items() if v}
    assert len(core_files()) > 30  # the walk found the package


def test_payloads_are_decoded_in_two_places_only():
    """Calls named ``decode``: the compressor (one payload, its codecs' parts) and the
    engine's message reader (the W payloads of a bucket, summed in rank order). Every
    front end goes through the engine."""
    callers = sorted(str(p.relative_to(PACKAGE)) for p in core_files()
                     if any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "decode"
                            for n in ast.walk(ast.parse(p.read_text()))))
    assert callers == ["compressor.py", "engine/messages.py"], callers

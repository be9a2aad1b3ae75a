"""``deepreduce codecs``: what is registered, one line each."""

from __future__ import annotations

import argparse

from ..codecs import INDEX_CODECS, VALUE_CODECS
from ..sparsifiers import get_sparsifier, sparsifiers


def _params_text(params) -> str:
    return ",".join(f"{p.name}={p.default}" for p in params)


def rows() -> list[tuple[str, str, str, str]]:
    """(kind, name, parameters with defaults, description) of every registered component."""
    out = []
    for name in sparsifiers():
        entry = get_sparsifier(name)
        out.append(("sparsifier", name, _params_text(entry.options), entry.description))
    for kind, registry in (("index", INDEX_CODECS), ("value", VALUE_CODECS)):
        for name in registry.names():
            cls = registry.lookup(name)
            lossy = "" if cls.lossless else "[lossy] "
            out.append((kind, name, _params_text(cls.options), lossy + cls.description))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepreduce codecs", description="List registered sparsifiers and codecs.")
    parser.parse_args(argv)
    table = rows()
    width_name = max(len(r[1]) for r in table)
    width_params = max(len(r[2]) for r in table)
    kind = None
    for row in table:
        if row[0] != kind:
            kind = row[0]
            print({"sparsifier": "sparsifiers:", "index": "index codecs:", "value": "value codecs:"}[kind])
        print(f"  {row[1]:<{width_name}}  {row[2]:<{width_params}}  {row[3]}")
    print('\nspec: "sparsifier:ratio/index:k=v,.../value:k=v,..."   e.g. "topk:0.01/eliasfano/fp16"')
    return 0

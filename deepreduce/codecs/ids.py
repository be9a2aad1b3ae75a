"""The one table of wire ids: the byte that names a sparsifier, an index codec or a value
codec in a payload header.

Ids are part of the wire format: never reuse or renumber one. A new component gets the
next free id here, and registering a component whose name is missing from this table
fails at import.
"""

from __future__ import annotations

WIRE_IDS: dict[str, dict[str, int]] = {
    "sparsifier": {"topk": 1, "threshold": 2, "randomk": 3, "mstopk": 4, "dgc": 5, "cyclic": 6, "blocktopk": 7},
    "index": {"raw": 1, "rle": 2, "eliasfano": 3, "zstd": 4, "bloom": 5, "strided": 6, "blocks": 7},
    "value": {"raw": 1, "fp16": 2, "bf16": 3, "zstd": 4, "qsgd": 5, "polyfit": 6, "dexp": 7, "uniform": 8},
}


def wire_id(kind: str, name: str) -> int:
    """The id of component ``name`` of ``kind`` (``sparsifier``, ``index``, ``value``)."""
    try:
        return WIRE_IDS[kind][name]
    except KeyError:
        raise RuntimeError(f"{kind} {name!r} has no wire id: add it to deepreduce/codecs/ids.py") from None


def name_of(kind: str, wire_id_: int) -> str | None:
    """The name behind a wire id, or None if the id is unknown."""
    for name, known in WIRE_IDS[kind].items():
        if known == wire_id_:
            return name
    return None

"""The configuration agreement check: ranks compare what they were configured with
before the first exchange, so a mismatch raises :class:`~deepreduce.ConfigError` on
every rank (naming both sides) instead of a hang or silently wrong sums."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..comm import Transport
from ..errors import ConfigError


def check_agreement(transport: Transport, description: Mapping[str, Any], what: str = "deepreduce") -> None:
    """All-gather ``description`` (JSON-able) and raise ConfigError on every rank if any
    entry differs between ranks. Collective: every rank must call it."""
    mine = json.dumps(description, sort_keys=True, default=str).encode()
    views = [_read_view(raw, rank, what) for rank, raw in enumerate(transport.allgather_bytes(mine))]
    problems = []
    for key in sorted(set().union(*views)):
        values = [view.get(key) for view in views]
        if all(value == values[0] for value in values):
            continue
        if key == "parameters":
            problems.append(_parameter_mismatch(values))
        else:
            problems.append(f"{key}: " + ", ".join(f"rank {rank}={value!r}" for rank, value in enumerate(values)))
    if problems:
        raise ConfigError(
            f"{what}: ranks disagree on the compression configuration ({'; '.join(problems)}). "
            "Every rank must build the same compressor and options."
        )


def _read_view(raw: bytes, rank: int, what: str) -> dict[str, Any]:
    """One rank's description; bytes that are not a JSON object (another deepreduce version,
    a corrupted message) are a disagreement too, raised as ConfigError like any other."""
    try:
        view = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{what}: rank {rank}'s configuration description is unreadable ({type(exc).__name__}: {exc}); "
                          "do all ranks run the same deepreduce?") from None
    if not isinstance(view, dict):
        raise ConfigError(f"{what}: rank {rank}'s configuration description is a JSON {type(view).__name__}, not an object")
    return view


def _parameter_mismatch(per_rank: list[Any]) -> str:
    reference = per_rank[0] or []
    for rank, params in enumerate(per_rank[1:], start=1):
        params = params or []
        if not isinstance(params, list) or not isinstance(reference, list):
            return f"parameters: rank 0 sent a {type(reference).__name__}, rank {rank} a {type(params).__name__}"
        if len(params) != len(reference):
            return f"parameters: rank 0 has {len(reference)} tensors, rank {rank} has {len(params)}"
        for ours, theirs in zip(reference, params):
            if ours != theirs:
                return f"parameters: rank 0 has {ours}, rank {rank} has {theirs}"
    return "parameters differ"

"""Bytes and time accounting of the engine (every front end reports these), and the
periodic log line.

Byte counts are what *this* rank hands to collectives, per bucket (a DDP bucket, or the
flat buffer of a front end's tensors):

- ``dense_bytes``: what the plain allreduce hook would hand over (the bucket's size);
- ``sent_bytes``: what it actually handed over: the padded payload of a compressed
  bucket (all ranks pad to the largest payload), the bucket itself for a dense one;
- ``payload_bytes``: its own unpadded payloads (compressed buckets only);
- ``broadcast_bytes``: of ``sent_bytes``, the shared-index scheme's index messages (each
  rank sends or receives every one once; the rest is the allreduce of the values).
- ``inter_node_bytes`` / ``intra_node_bytes`` (``scheme="hierarchical"`` only): what it
  handed to the collectives between nodes and to the dense ones inside its node. Its
  compressed buckets' ``sent_bytes`` are the inter-node part, and its dense buckets
  (warm-up, below ``min_numel``) are allreduced over every rank, across the nodes: so
  ``inter_node_bytes`` equals ``sent_bytes``.

``ratio = dense_bytes / sent_bytes``. These totals include the dense warm-up; the
``steady`` entry reports the same figures counted from the first step at the target
density (after ``start_iter`` and ``density_warmup``): its ``ratio``, ``bits_per_kept``
and ``sent_bytes_per_step`` are what a long run costs. An allreduce moves about twice its input over the
wire and an all-gather W-1 times its input (sparse pays while W * payload < 2 * dense
bytes); these counters count inputs, so they stay comparable with what other hooks report.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger("deepreduce")


@dataclass
class _Counters:
    steps: int = 0
    buckets: int = 0  # hook calls
    compressed_buckets: int = 0
    warmup_buckets: int = 0  # dense because step < start_iter
    small_buckets: int = 0  # dense because numel < min_numel
    planned_dense_buckets: int = 0  # compressor="auto": sent dense or fp16 by the plan
    dense_fallbacks: int = 0  # compressed, then sent dense: the gather would move more than allreduce
    nonfinite_buckets: int = 0  # sent dense because some rank's bucket held NaN/Inf
    dense_bytes: int = 0
    sent_bytes: int = 0
    payload_bytes: int = 0
    broadcast_bytes: int = 0  # shared-index scheme: index messages (part of sent_bytes)
    numel: int = 0  # elements of compressed buckets
    kept: int = 0  # elements carried by their payloads
    compress_s: float = 0.0  # error feedback + sparsify + encode
    exchange_s: float = 0.0  # message size exchange (blocking)
    size_exchanges: int = 0  # blocking size exchanges run (none where every rank computes the sizes)
    decompress_s: float = 0.0  # decode + sum of W payloads
    inter_node_bytes: int = 0  # scheme "hierarchical": handed to collectives between nodes (the slow links)
    intra_node_bytes: int = 0  # ... and to the dense collectives inside a node


class CommStats:
    """Thread-safe counters (decoding finishes on the backend's threads). Picklable: the
    lock is made anew on unpickling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = _Counters()
        self._steady_from: _Counters | None = None  # the counters when the steady phase began

    @property
    def steady_marked(self) -> bool:
        return self._steady_from is not None

    def mark_steady(self) -> None:
        """The steady phase (target density) starts now."""
        with self._lock:
            self._steady_from = _Counters(**asdict(self._c))

    def __getstate__(self) -> dict[str, Any]:
        return self.state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self.load_state_dict(state)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._c, name, getattr(self._c, name) + delta)

    def get(self, name: str) -> float:
        """One counter's running total."""
        with self._lock:
            return getattr(self._c, name)

    def as_dict(self) -> dict[str, Any]:
        """Counters plus derived ``ratio``, ``density`` and ``bits_per_kept``, and
        ``steady``: the same for the steady phase only (None before it starts)."""
        with self._lock:
            out: dict[str, Any] = asdict(self._c)
            base = None if self._steady_from is None else asdict(self._steady_from)
        out.update(_derived(out))
        if base is None:
            out["steady"] = None
        else:
            steady = {name: out[name] - base[name] for name in base}
            steady.update(_derived(steady))
            steady["sent_bytes_per_step"] = steady["sent_bytes"] / steady["steps"] if steady["steps"] else None
            out["steady"] = steady
        return out

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            state = asdict(self._c)
            if self._steady_from is not None:
                state["steady_from"] = asdict(self._steady_from)
            return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        steady_from = state.pop("steady_from", None)
        known = {f.name for f in fields(_Counters)}
        for given in (state, steady_from or {}):
            unknown = set(given) - known
            if unknown:
                raise ValueError(f"stats state: unknown fields {sorted(unknown)}")
        with self._lock:
            self._c = _Counters(**state)
            self._steady_from = None if steady_from is None else _Counters(**steady_from)

    def reset(self) -> None:
        with self._lock:
            self._c = _Counters()
            self._steady_from = None


def _derived(counts: dict[str, Any]) -> dict[str, Any]:
    return {
        "ratio": counts["dense_bytes"] / counts["sent_bytes"] if counts["sent_bytes"] else 1.0,
        "density": counts["kept"] / counts["numel"] if counts["numel"] else None,
        "bits_per_kept": 8 * counts["payload_bytes"] / counts["kept"] if counts["kept"] else None,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """One log line: the numbers worth watching while training."""
    steady = stats.get("steady")
    parts = [f"steps {stats['steps']}", f"ratio {stats['ratio']:.1f}x"]
    if steady and steady["steps"]:
        parts.append(f"steady ratio {steady['ratio']:.1f}x")
        parts.append(f"sent {steady['sent_bytes_per_step'] / 1e6:.3f} MB/step (steady)")
    else:
        parts.append(f"sent {stats['sent_bytes'] / max(stats['steps'], 1) / 1e6:.3f} MB/step")
    if stats.get("density") is not None:
        parts.append(f"density {stats['density']:.4g}")
    if stats.get("bits_per_kept") is not None:
        parts.append(f"{stats['bits_per_kept']:.1f} bits/kept")
    steps = max(stats["steps"], 1)
    parts.append(f"compress {1e3 * stats['compress_s'] / steps:.1f} ms/step")
    parts.append(f"decompress {1e3 * stats['decompress_s'] / steps:.1f} ms/step")
    parts.append(f"dense fallbacks {stats['dense_fallbacks']}/{stats['compressed_buckets'] + stats['dense_fallbacks']}")
    if stats.get("nonfinite_buckets"):
        parts.append(f"non-finite buckets {stats['nonfinite_buckets']}")
    return ", ".join(parts)


def log_stats(stats: dict[str, Any], prefix: str = "deepreduce") -> None:
    logger.info("%s: %s", prefix, format_stats(stats))

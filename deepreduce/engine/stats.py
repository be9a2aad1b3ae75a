"""Bytes and time accounting of the engine (every front end reports these), and the
periodic log line.

Byte counts are what *this* rank hands to collectives, per bucket (a DDP bucket, or the
flat buffer of a front end's tensors):

- ``dense_bytes``: what the plain allreduce hook would hand over (the bucket's size);
- ``sent_bytes``: what it actually handed over: the padded payload of a compressed
  bucket (all ranks pad to the largest payload), the bucket itself for a dense one;
- ``payload_bytes``: its own unpadded payloads (compressed buckets only).

``ratio = dense_bytes / sent_bytes``. An allreduce moves about twice its input over the
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
    dense_fallbacks: int = 0  # compressed, then sent dense: the gather would move more than allreduce
    dense_bytes: int = 0
    sent_bytes: int = 0
    payload_bytes: int = 0
    numel: int = 0  # elements of compressed buckets
    kept: int = 0  # elements carried by their payloads
    compress_s: float = 0.0  # error feedback + sparsify + encode
    exchange_s: float = 0.0  # message size exchange (blocking)
    decompress_s: float = 0.0  # decode + sum of W payloads


class CommStats:
    """Thread-safe counters (decoding finishes on the backend's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = _Counters()

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._c, name, getattr(self._c, name) + delta)

    def as_dict(self) -> dict[str, Any]:
        """Counters plus derived ``ratio``, ``density`` and ``bits_per_kept``."""
        with self._lock:
            out: dict[str, Any] = asdict(self._c)
        out["ratio"] = out["dense_bytes"] / out["sent_bytes"] if out["sent_bytes"] else 1.0
        out["density"] = out["kept"] / out["numel"] if out["numel"] else None
        out["bits_per_kept"] = 8 * out["payload_bytes"] / out["kept"] if out["kept"] else None
        return out

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._c)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(_Counters)}
        unknown = set(state) - known
        if unknown:
            raise ValueError(f"stats state: unknown fields {sorted(unknown)}")
        with self._lock:
            self._c = _Counters(**state)

    def reset(self) -> None:
        with self._lock:
            self._c = _Counters()


def format_stats(stats: dict[str, Any]) -> str:
    """One log line: the numbers worth watching while training."""
    parts = [
        f"steps {stats['steps']}",
        f"ratio {stats['ratio']:.1f}x",
        f"sent {stats['sent_bytes'] / max(stats['steps'], 1) / 1e6:.3f} MB/step",
    ]
    if stats.get("density") is not None:
        parts.append(f"density {stats['density']:.4g}")
    if stats.get("bits_per_kept") is not None:
        parts.append(f"{stats['bits_per_kept']:.1f} bits/kept")
    steps = max(stats["steps"], 1)
    parts.append(f"compress {1e3 * stats['compress_s'] / steps:.1f} ms/step")
    parts.append(f"decompress {1e3 * stats['decompress_s'] / steps:.1f} ms/step")
    parts.append(f"dense fallbacks {stats['dense_fallbacks']}/{stats['compressed_buckets'] + stats['dense_fallbacks']}")
    return ", ".join(parts)


def log_stats(stats: dict[str, Any], prefix: str = "deepreduce") -> None:
    logger.info("%s: %s", prefix, format_stats(stats))

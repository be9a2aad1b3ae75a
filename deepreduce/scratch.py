"""Reusable work buffers for the per-step hot path.

A fresh 100 MB temporary costs more than the pass that fills it on CPU (the allocator
hands large blocks back to the OS, and every page faults in again on the next use), so
full-size temporaries of a step -- ``|x|`` for selection, the comparison mask -- live in
buffers kept across steps, grown to the largest request. The price is memory: about
1.25x the largest fp32 tensor compressed (the magnitude and a boolean mask), per thread
that compresses.
"""

from __future__ import annotations

import threading

import torch


class Scratch:
    """Named, grow-only work buffers, one set per thread (so concurrent users never share one)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements with undefined contents, valid until the
        next :meth:`get` of the same name on this thread."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        key = (name, dtype, torch.device(device))
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffers.pop(key, None)  # free the old one before allocating its successor
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    def clear(self) -> None:
        """Release this thread's buffers."""
        self._local.buffers = {}

    def __getstate__(self) -> dict:
        return {"buffers": None}  # a cache: never pickled (a non-empty state, so __setstate__ runs)

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

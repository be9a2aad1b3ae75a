"""Per-phase time accounting of one compressed bucket (``deepreduce bench codecs --profile``).

    timer = PhaseTimer()
    engine.phases = timer              # the engine and its compressor report into it
    ...
    timer.totals()                     # {"select": 0.21, "index encode": 0.03, ...} seconds

A phase is the time since the previous :meth:`PhaseTimer.mark` of the same thread;
:meth:`start` resets that reference point. The clock is the process's CPU time by
default (``time.process_time``: on a busy machine wall time mostly measures the other
processes; run torch with one thread so CPU time is the work done), or any other. Nothing is recorded when no timer is set, so
the hot path pays one ``is None`` test per phase. Timings on CUDA need a synchronised
device to mean anything (the profile bench synchronises around whole steps only).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable


class PhaseTimer:
    """Accumulated seconds per named phase (marks from any thread add up)."""

    def __init__(self, clock: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._totals: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def start(self) -> None:
        """Begin timing from now on this thread."""
        self._local.last = self.clock()

    def mark(self, phase: str) -> None:
        """Charge the time since the last mark (or :meth:`start`) on this thread to ``phase``."""
        now = self.clock()
        last = getattr(self._local, "last", None)
        self._local.last = now
        if last is None:
            return
        with self._lock:
            self._totals[phase] += now - last
            self._counts[phase] += 1

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)

    def reset(self) -> None:
        with self._lock:
            self._totals.clear()
            self._counts.clear()


def mark(timer: PhaseTimer | None, phase: str) -> None:
    """``timer.mark(phase)`` when a timer is set."""
    if timer is not None:
        timer.mark(phase)

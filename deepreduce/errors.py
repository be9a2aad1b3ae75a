"""Exceptions raised by deepreduce."""

from __future__ import annotations

import re
from typing import Any


class DeepReduceError(Exception):
    """Base class of every deepreduce error."""


class DecodeError(DeepReduceError, ValueError):
    """A payload or a received message is malformed: the message names the field that failed
    validation (for a message: the source rank and segment)."""


class ConfigError(DeepReduceError, ValueError):
    """A compressor, codec or sparsifier was configured with bad or unknown parameters."""


class NonFiniteError(DeepReduceError, FloatingPointError):
    """A gradient held NaN or Inf and the engine was told to raise (``nonfinite="raise"``)."""


class CommunicationError(DeepReduceError, RuntimeError):
    """A collective failed (a peer died, a link went down, the process group's timeout
    passed); the message names the bucket and step."""


_ERRORS = {cls.__name__: cls for cls in (DeepReduceError, DecodeError, ConfigError, NonFiniteError, CommunicationError)}
_CALLBACK = re.compile(r"when running the callback: (\w+): ")


def wait(future: Any) -> Any:
    """``future.wait()``, where a deepreduce error raised in one of its callbacks comes back
    as itself, not as the RuntimeError torch hands the waiter (which keeps only the
    message): ``except DecodeError`` then works around a collective's result too."""
    try:
        return future.wait()
    except RuntimeError as exc:
        raise _original(exc) from exc


def _original(exc: RuntimeError) -> BaseException:
    """The innermost deepreduce error that ``exc``'s message carries, rebuilt; else ``exc``."""
    text = str(exc)
    found = [m for m in _CALLBACK.finditer(text) if m.group(1) in _ERRORS]
    if not found:
        return exc
    last = found[-1]
    return _ERRORS[last.group(1)](text[last.end():].split("\n\nAt:\n", 1)[0].rstrip())

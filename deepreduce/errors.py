"""Exceptions raised by deepreduce."""

from __future__ import annotations


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

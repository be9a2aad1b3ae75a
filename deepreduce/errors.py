"""Exceptions raised by deepreduce."""

from __future__ import annotations


class DeepReduceError(Exception):
    """Base class of every deepreduce error."""


class DecodeError(DeepReduceError, ValueError):
    """A payload or a received message is malformed: the message names the field that failed
    validation (for a message: the source rank and segment)."""


class ConfigError(DeepReduceError, ValueError):
    """A compressor, codec or sparsifier was configured with bad or unknown parameters."""

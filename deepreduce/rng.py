"""Private random streams: every random choice comes from a generator seeded by
(seed, step, key), never from torch's global RNG, so all ranks can replay it. The key
names what is compressed (a parameter, a bucket)."""

from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_key(key: int | str) -> int:
    """An int stream key for ``key``: ints as they are, names by their CRC-32 (stable
    across processes and machines, unlike ``hash``)."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"a stream key is an int or a str, got {type(key).__name__}")
    return key if isinstance(key, int) else zlib.crc32(key.encode())


def stream_seed(seed: int, step: int, key: int) -> int:
    """A 63-bit seed for one (seed, step, key); it travels in the payload header."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (step & _MASK64))
    x = _splitmix64(x ^ (key & _MASK64))
    return x >> 1


def generator(rng_seed: int, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one purpose (``salt``) within one payload's stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_splitmix64(rng_seed ^ _splitmix64(salt)) >> 1)
    return gen

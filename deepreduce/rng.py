"""Private random streams: every random choice comes from a generator seeded by
(seed, step, bucket), never from torch's global RNG, so all ranks can replay it."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, step: int, bucket: int) -> int:
    """A 63-bit seed for one (seed, step, bucket); it travels in the payload header."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (step & _MASK64))
    x = _splitmix64(x ^ (bucket & _MASK64))
    return x >> 1


def generator(rng_seed: int, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one purpose (``salt``) within one payload's stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_splitmix64(rng_seed ^ _splitmix64(salt)) >> 1)
    return gen

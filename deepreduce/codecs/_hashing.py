"""On-the-fly vectorised hashing for Bloom filters: no tables, no files.

A position ``x`` is split into its low 32 bits ``lo`` and high bits ``hi``. Two
32-bit keys ``k1, k2`` come from splitmix64 of ``(key, hi)`` (``key`` is per payload),
and the base hashes of double hashing are

    h1 = fmix32(lo ^ k1),    h2 = fmix32(h1 ^ k2),    g_i = h1 + i*h2 (mod 2^32)

(``fmix32`` is MurmurHash3's finaliser: a bijection with full avalanche). ``g_i`` is
mapped onto the ``m`` filter bits by multiply-shift, ``g_i * m >> 32``, which is
uniform and exact in int64 for ``m < 2^31``. For tensors below 2^32 elements ``hi``
is always 0, so the query of a whole tensor is pure 32-bit arithmetic -- much
cheaper than 64-bit on CPUs without 64-bit vector multiplies -- and ``h2`` is only
computed for the positions that pass the first hash.

All of it is plain torch integer arithmetic: it runs on the tensor's device and
gives the same bits on every rank. torch's integer multiplication and addition
wrap around; right shifts are arithmetic, so each logical shift is followed by a mask.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
MAX_FILTER_BITS = (1 << 31) - 1  # keeps g * m below 2^63
_GOLDEN = 0x9E3779B97F4A7C15
_FMIX_MUL1 = 0x85EBCA6B
_FMIX_MUL2 = 0xC2B2AE35
_KEY2_SALT = 0x6B657932


def signed32(x: int) -> int:
    """A 32-bit pattern as the signed int32 torch stores."""
    x &= MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def splitmix64(x: int) -> int:
    """Reference (pure Python) splitmix64."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def fmix32_reference(h: int) -> int:
    """Reference (pure Python) MurmurHash3 fmix32."""
    h &= MASK32
    h ^= h >> 16
    h = (h * _FMIX_MUL1) & MASK32
    h ^= h >> 13
    h = (h * _FMIX_MUL2) & MASK32
    return h ^ (h >> 16)


def hash_key(rng_seed: int, salt: int) -> int:
    """A 64-bit hashing key for one payload (``rng_seed`` from its header)."""
    return splitmix64((rng_seed & _MASK64) ^ splitmix64(salt))


def high_keys(key: int, high: int) -> tuple[int, int]:
    """``(k1, k2)`` (unsigned 32-bit) for the positions whose bits above 32 are ``high``."""
    k1 = splitmix64((key + high) & _MASK64) & MASK32
    k2 = splitmix64(((key ^ _KEY2_SALT) + high) & _MASK64) & MASK32
    return k1, k2


def fmix32_(h: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 fmix32 of an int32 tensor, in place (``scratch``: same shape)."""
    for shift, multiplier in ((16, _FMIX_MUL1), (13, _FMIX_MUL2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=scratch)
        scratch.bitwise_and_((1 << (32 - shift)) - 1)
        h.bitwise_xor_(scratch)
        if multiplier is not None:
            h.mul_(signed32(multiplier))
    return h


def first_hashes_into(start: int, offsets: torch.Tensor, key: int, out: torch.Tensor, scratch: torch.Tensor) -> int:
    """``h1`` of the positions ``start + offsets`` into ``out`` (int32, no allocation);
    returns the positions' ``k2`` (signed) for computing ``h2`` later.

    ``start`` must be a multiple of a power of two above every offset (the query's
    chunks are), so all positions share ``start``'s high part and
    ``lo = (start mod 2^32) | offset``."""
    k1, k2 = high_keys(key, start >> 32)
    torch.bitwise_xor(offsets, signed32((start & MASK32) ^ k1), out=out)
    fmix32_(out, scratch)
    return signed32(k2)


def second_hashes(h1: torch.Tensor, signed_k2: int) -> torch.Tensor:
    """``h2 = fmix32(h1 ^ k2)`` (a new int32 tensor)."""
    return fmix32_(h1 ^ signed_k2, torch.empty_like(h1))


def bit_of(g: torch.Tensor, nbits: int) -> torch.Tensor:
    """Map 32-bit hashes (any integer dtype holding the bit pattern) onto ``[0, nbits)``."""
    return ((g.to(torch.int64) & MASK32) * nbits) >> 32


def base_hashes(positions: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h1, h2)`` of int64 positions, as int32 bit patterns."""
    high = positions >> 32
    k1 = torch.zeros_like(positions)
    k2 = torch.zeros_like(positions)
    # Keys per distinct high part (a single one below 2^32 elements).
    for value in torch.unique(high).tolist():
        a, b = high_keys(key, value)
        k1.masked_fill_(high == value, a)
        k2.masked_fill_(high == value, b)
    h1 = ((positions & MASK32) ^ k1).to(torch.int32)  # int64 -> int32 keeps the low 32 bits
    fmix32_(h1, torch.empty_like(h1))
    return h1, fmix32_(h1 ^ k2.to(torch.int32), torch.empty_like(h1))


def random_words(rng_seed: int, salt: int, n: int, device: torch.device | str) -> torch.Tensor:
    """``n`` pseudo-random 32-bit words (int64 in ``[0, 2^32)``) of one stream.

    Counter-based: word ``i`` is ``fmix32(fmix32(i ^ k1) ^ k2)`` with keys from
    ``(rng_seed, salt)``. Unlike a ``torch.Generator``, whose streams differ between
    CPU and CUDA, plain integer arithmetic gives the same words on every device, so a
    decoder that replays a random choice agrees with the encoder wherever either runs.
    ``fmix32`` is a bijection, so the words of ``n <= 2^32`` counters are distinct."""
    k1, k2 = high_keys(hash_key(rng_seed, salt), 0)
    words = torch.arange(n, dtype=torch.int64, device=device).to(torch.int32)  # low 32 bits
    scratch = torch.empty_like(words)
    words.bitwise_xor_(signed32(k1))
    fmix32_(words, scratch)
    words.bitwise_xor_(signed32(k2))
    fmix32_(words, scratch)
    return words.to(torch.int64) & MASK32


def random_subset(rng_seed: int, salt: int, n: int, r: int, device: torch.device | str) -> torch.Tensor:
    """``r`` distinct positions of ``[0, n)``, uniformly chosen, ascending (device-independent)."""
    if r >= n:
        return torch.arange(n, device=device)
    pick = torch.topk(random_words(rng_seed, salt, n, device), r, largest=False, sorted=False).indices
    return torch.sort(pick).values


def all_bits(positions: torch.Tensor, key: int, nhashes: int, nbits: int) -> torch.Tensor:
    """The ``(len(positions), nhashes)`` filter bits of each int64 position."""
    h1, h2 = base_hashes(positions.reshape(-1).to(torch.int64), key)
    steps = torch.arange(nhashes, dtype=torch.int64, device=positions.device)
    g = (h1.to(torch.int64).unsqueeze(1) & MASK32) + steps * (h2.to(torch.int64).unsqueeze(1) & MASK32)
    return bit_of(g, nbits)

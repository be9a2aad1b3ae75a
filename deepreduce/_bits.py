"""Vectorised bit packing on torch tensors (any device).

Fields are written little-endian into a stream of 32-bit words: field ``i`` of
width ``w`` occupies stream bits ``[off_i, off_i + w)``. A field of up to 32 bits
starting at bit offset ``o < 32`` of a word spans at most two words, and
``value << o`` stays below 2**63, so plain int64 arithmetic never overflows.

On the CPU the same streams are built with numpy on the tensors' memory: a compressed
step packs and unpacks a few streams per tensor, and for the many small tensors of a
model torch's per-operation cost is most of the time (numpy's is several times lower).
Both paths write the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF


def packed_nbytes(total_bits: int) -> int:
    """Bytes used by a stream of ``total_bits`` bits (rounded up to whole 32-bit words)."""
    return 4 * ((total_bits + 31) // 32)


def _scatter_fields(values: torch.Tensor, offsets: torch.Tensor, nwords: int) -> torch.Tensor:
    """Add ``values`` (each < 2**32) at bit ``offsets`` into ``nwords`` 32-bit words."""
    words = torch.zeros(nwords + 1, dtype=torch.int64, device=values.device)
    if values.numel():
        word = offsets >> 5
        shifted = values << (offsets & 31)
        # Fields never overlap, so adding is the same as OR-ing the bits.
        words.index_add_(0, word, shifted & _MASK32)
        words.index_add_(0, word + 1, shifted >> 32)
    return words[:nwords]


def _host_stream(values: np.ndarray, offsets: np.ndarray, nwords: int) -> torch.Tensor:
    """The bytes of ``nwords`` 32-bit words holding ``values`` (each < 2**32) at bit
    ``offsets``, built by numpy. Each word is a sum of distinct bits below 2**32, which
    float64 (bincount's weights) holds exactly."""
    word = offsets >> 5
    shifted = values << (offsets & 31)
    words = np.bincount(word, weights=shifted & _MASK32, minlength=nwords + 1)
    words += np.bincount(word + 1, weights=shifted >> 32, minlength=nwords + 1)
    return torch.from_numpy(words[:nwords].astype(np.uint32).view(np.uint8))


def _host_words(data: np.ndarray) -> np.ndarray:
    """Little-endian 32-bit words of ``data`` (whole words) as int64, and one zero word
    after them (a field's spill into the next word reads it)."""
    words = np.zeros(data.size // 4 + 1, dtype=np.int64)
    words[:-1] = np.ascontiguousarray(data).view("<u4")
    return words


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    # int64 holding values < 2**32 -> int32 with wrap-around -> raw little-endian bytes.
    return (words - ((words >> 31) << 32)).to(torch.int32).view(torch.uint8)


def _bytes_to_words(data: torch.Tensor) -> torch.Tensor:
    return data.view(torch.int32).to(torch.int64) & _MASK32


def pack_fixed(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative int64 ``values`` (each < 2**width) at ``width`` bits each."""
    if width < 0 or width > 64:
        raise ValueError(f"bit width must be in [0, 64], got {width}")
    n = values.numel()
    if width == 0 or n == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    values = values.reshape(-1).to(torch.int64)
    if width > 32:
        low = pack_fixed(values & _MASK32, 32)
        high = pack_fixed(values >> 32, width - 32)
        return torch.cat([low, high])
    nwords = (n * width + 31) // 32
    array = host_array(values)
    if array is not None:
        if width <= 8:  # each field's bits as bytes, then numpy's packbits: one small temporary per bit
            fields = array.astype(np.uint8)
            bits = np.empty((n, width), dtype=np.uint8)
            for bit in range(width):
                np.bitwise_and(np.right_shift(fields, bit), 1, out=bits[:, bit])
            return _bit_bytes(bits.reshape(-1), nwords)
        return _host_stream(array, np.arange(n, dtype=np.int64) * width, nwords)
    offsets = torch.arange(n, dtype=torch.int64, device=values.device) * width
    return _words_to_bytes(_scatter_fields(values, offsets, nwords))


def _bit_bytes(bits: np.ndarray, nwords: int) -> torch.Tensor:
    """The stream of ``nwords`` 32-bit words whose bits, in order, are ``bits`` (0/1 or
    bool, one per byte), zero-padded: little-endian words are their bytes in order."""
    packed = np.zeros(4 * nwords, dtype=np.uint8)
    packed[: (bits.size + 7) // 8] = np.packbits(bits, bitorder="little")
    return torch.from_numpy(packed)


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """``pack_fixed(mask, 1)`` of a bool tensor, without widening it to int64 first (the
    same bytes; :func:`bitmap_to_bool` reads them back)."""
    n = mask.numel()
    array = host_array(mask)
    if array is None or n == 0:
        return pack_fixed(mask.reshape(-1).to(torch.int64), 1)
    return _bit_bytes(array.reshape(-1), (n + 31) // 32)


def unpack_fixed(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_fixed`; ``data`` must hold exactly ``packed_nbytes(count*width)`` bytes
    (for width > 32: the two halves back to back)."""
    device = data.device
    if width == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64, device=device)
    if width > 32:
        split = packed_nbytes(count * 32)
        low = unpack_fixed(data[:split], 32, count)
        high = unpack_fixed(data[split:], width - 32, count)
        return low | (high << 32)
    array = host_array(data)
    if array is not None:
        if width <= 8:  # numpy unpacks the bits a byte each; each field is a row of them
            bits = np.unpackbits(np.ascontiguousarray(array), count=count * width, bitorder="little")
            bits = bits.reshape(count, width)
            fields = bits[:, 0].copy()
            for bit in range(1, width):
                fields |= bits[:, bit] << np.uint8(bit)
            return torch.from_numpy(fields.astype(np.int64))
        words = _host_words(array)
        offsets = np.arange(count, dtype=np.int64) * width
        word = offsets >> 5
        both = words[word] | (words[word + 1] << 32)
        return torch.from_numpy((both >> (offsets & 31)) & ((1 << width) - 1))
    words = _bytes_to_words(data)
    words = torch.cat([words, words.new_zeros(1)])
    offsets = torch.arange(count, dtype=torch.int64, device=device) * width
    word = offsets >> 5
    shift = offsets & 31
    both = words.index_select(0, word) | (words.index_select(0, word + 1) << 32)
    # Arithmetic shift may fill the top bits with ones; they sit above bit `width` and are masked.
    return (both >> shift) & ((1 << width) - 1)


def fixed_nbytes(count: int, width: int) -> int:
    """Size in bytes of ``pack_fixed`` output for ``count`` fields of ``width`` bits."""
    if width == 0 or count == 0:
        return 0
    if width > 32:
        return packed_nbytes(count * 32) + packed_nbytes(count * (width - 32))
    return packed_nbytes(count * width)


def pack_bitmap(positions: torch.Tensor, nbits: int) -> torch.Tensor:
    """Bitmap of ``nbits`` bits with ones at the given unique ``positions``."""
    nwords = (nbits + 31) // 32
    positions = positions.reshape(-1).to(torch.int64)
    array = host_array(positions)
    if array is not None:
        if nbits <= 64 * array.size:  # a byte per bit is smaller than the word stream's temporaries
            bits = np.zeros(nbits, dtype=np.bool_)
            bits[array] = True
            return _bit_bytes(bits, nwords)
        return _host_stream(np.ones_like(array), array, nwords)
    ones = torch.ones_like(positions)
    return _words_to_bytes(_scatter_fields(ones, positions, nwords))


def bitmap_to_bool(data: torch.Tensor, nbits: int) -> torch.Tensor:
    """Expand a little-endian bitmap into ``nbits`` booleans."""
    array = host_array(data)
    if array is not None:
        return torch.from_numpy(np.unpackbits(array, count=nbits, bitorder="little").view(np.bool_))
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    bits = (data.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:nbits].bool()


# dtypes whose CPU tensors numpy can view without a copy (not bfloat16)
_NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int32, torch.int64}


def host_array(tensor: torch.Tensor) -> np.ndarray | None:
    """``tensor`` as a numpy array on the same memory, or None where numpy cannot view it
    (another device, bfloat16, a tensor that needs grad). On one CPU thread numpy's
    element-wise passes over large tensors are often several times faster than torch's."""
    if tensor.device.type != "cpu" or tensor.dtype not in _NUMPY_DTYPES or tensor.requires_grad:
        return None
    return tensor.numpy()


def strictly_ascending(values: torch.Tensor) -> bool:
    """Whether the 1-D ``values`` strictly increase (numpy on the CPU: torch's comparison
    and ``all`` over a large int64 tensor take several times as long on one thread)."""
    if values.numel() < 2:
        return True
    array = host_array(values)
    if array is not None:
        return bool((np.diff(array) > 0).all())
    return bool((values[1:] > values[:-1]).all())


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` (same shape and elements), through numpy on the CPU (faster there)."""
    left, right = host_array(a), host_array(b)
    if left is not None and right is not None and a.dtype == b.dtype:
        return bool(np.array_equal(left, right))
    return torch.equal(a, b)


def true_positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending int64 positions of the true entries of a 1-D bool tensor (numpy's
    ``flatnonzero`` on the CPU: the same result as ``torch.nonzero``, faster)."""
    array = host_array(mask)
    if array is not None:
        return torch.from_numpy(np.flatnonzero(array).astype(np.int64, copy=False))
    return torch.nonzero(mask).reshape(-1)


def bitmap_positions(data: torch.Tensor, nbits: int) -> torch.Tensor:
    """Ascending positions of the set bits among the first ``nbits`` bits."""
    return true_positions(bitmap_to_bool(data, nbits))


def bit_length(x: int) -> int:
    """Bits needed to write the non-negative integer ``x`` (0 for 0)."""
    return int(x).bit_length()

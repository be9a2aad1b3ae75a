"""``blocks`` index codec: an index set made of whole aligned blocks, written as block ids.

The positions ``[b*block, (b+1)*block)`` (the last block cut at ``numel``) of each kept
block ``b`` travel as ``b`` alone, in whichever layout is smaller for this payload: a
bitmap of ``ceil(numel / block)`` bits, or the block ids through the ``eliasfano``
codec's gap coding (about ``log2(blocks / kept) + 2`` bits per kept block). Pair it
with the ``blocktopk`` sparsifier at the same ``block``; an index set that is not made of
whole blocks of that size is refused when it is encoded (a :class:`ConfigError`).

The block size travels in the header, so a payload decodes on its own. The number of
kept blocks follows from ``k``: ``k / block``, or one more when the (shorter) last
block is among them, which ``k mod block`` tells.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping

import numpy as np
import torch

from ... import _bits
from ...errors import ConfigError, DecodeError
from ...options import Option
from .. import CodecContext, IndexCodec, IndexEncoding, PartSize, register_index_codec
from .._common import expect_nbytes, unpack_params
from .eliasfano import decode_ascending, encode_ascending, size_bound

_PARAMS = "<IBBQ"  # block size, layout, Elias-Fano low-bit width, Elias-Fano unary bits
BITMAP, ELIASFANO = 0, 1
MAX_BLOCK = (1 << 31) - 1


def blocks_in(numel: int, block: int) -> int:
    return -(-numel // block)


def blocks_of_count(numel: int, k: int, block: int) -> tuple[int, bool | None] | None:
    """``(kept blocks, whether the last block is kept)`` for ``k`` positions made of whole
    blocks -- the second None when ``k`` does not tell (the last block is full) -- or None
    when no set of whole blocks has ``k`` positions."""
    if not 0 <= k <= numel:
        return None
    last = numel - (blocks_in(numel, block) - 1) * block if numel else block
    if k % block == 0:
        return k // block, (None if last == block else False)
    if k % block == last:
        return k // block + 1, True
    return None


def expand_blocks(block_ids: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    """Ascending positions of the ascending ``block_ids`` (the last block cut at ``numel``)."""
    # A block longer than the tensor is the tensor itself (one block, cut at numel): the
    # offsets stop there, so a payload's block size cannot make this allocate past numel.
    span = min(block, numel)
    ids = _bits.host_array(block_ids)
    if ids is not None:  # numpy's broadcast add is faster on one CPU thread
        positions = torch.from_numpy(np.add.outer(ids.astype(np.int64) * block, np.arange(span, dtype=np.int64)).reshape(-1))
    else:
        offsets = torch.arange(span, dtype=torch.int64, device=block_ids.device)
        positions = (block_ids.reshape(-1, 1) * block + offsets).reshape(-1)
    if block_ids.numel() and int(block_ids[-1]) * block + span > numel:
        positions = positions[: positions.numel() - (int(block_ids[-1]) * block + span - numel)]
    return positions


def whole_block_ids(indices: torch.Tensor, block: int, numel: int) -> torch.Tensor | None:
    """The ascending ids of the whole aligned blocks whose positions ``indices`` lists in
    order (the last block cut at ``numel``), or None when it is not such a list. Every
    block starts ``block`` positions after the previous one, so the ids are those of
    every ``block``-th index; the list must then be their expansion."""
    shape = blocks_of_count(numel, indices.numel(), block)
    if shape is None:
        return None
    block_ids = indices[::block] // block
    if block_ids.numel() != shape[0]:
        return None
    if not _bits.strictly_ascending(block_ids):
        return None
    return block_ids if _bits.same_values(expand_blocks(block_ids, block, numel), indices) else None


@register_index_codec
class BlocksIndexCodec(IndexCodec):
    name = "blocks"
    description = ("whole aligned blocks as block ids (bitmap or Elias-Fano, whichever is smaller); "
                   "pair with the blocktopk sparsifier at the same block")
    general = False
    sparsifier = "blocktopk"
    options = (
        Option("block", int, 64, "elements per block (the sparsifier's)", check=lambda v: 1 <= v <= MAX_BLOCK,
               check_text=f"must be in [1, {MAX_BLOCK}]"),
    )

    def check_sparsifier(self, name: str, options: Mapping[str, Any], ratio: float) -> None:
        super().check_sparsifier(name, options, ratio)
        block = self.config["block"]
        if name == "blocktopk" and options["block"] % block:
            raise ConfigError(f"the blocks index codec (block={block}) cannot carry blocktopk's blocks of "
                              f"{options['block']}: give both the same block (e.g. blocks:block={options['block']})")

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        block = self.config["block"]
        k = indices.numel()
        nblocks = blocks_in(ctx.numel, block)
        block_ids = whole_block_ids(indices, block, ctx.numel)
        if block_ids is None:
            raise ConfigError(
                f"the blocks index codec (block={block}) carries whole aligned blocks of {block} positions only: "
                f"use it with the blocktopk sparsifier at block={block}")
        ef, low_width, nbits = encode_ascending(block_ids, nblocks)
        if ef.numel() < _bits.packed_nbytes(nblocks) or k == 0:
            return IndexEncoding(ef, struct.pack(_PARAMS, block, ELIASFANO, low_width, nbits), indices)
        data = _bits.pack_bitmap(block_ids, nblocks)
        return IndexEncoding(data, struct.pack(_PARAMS, block, BITMAP, 0, 0), indices)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize:
        # The smaller layout is picked per payload; the Elias-Fano size is itself a bound.
        block = self.config["block"]
        nblocks = blocks_in(numel, block)
        kept = -(-k // block)
        data = 0 if k == 0 else min(_bits.packed_nbytes(nblocks), size_bound(nblocks, kept))
        return PartSize(data, struct.calcsize(_PARAMS), exact=False)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        block, layout, low_width, nbits = unpack_params(_PARAMS, params, cls.name)
        if not 1 <= block <= MAX_BLOCK:
            raise DecodeError(f"blocks: block size {block} out of range")
        shape = blocks_of_count(ctx.numel, k, block)
        if shape is None:
            raise DecodeError(f"blocks: k={k} is not a count of whole {block}-blocks of numel={ctx.numel}")
        kept, last_kept = shape
        nblocks = blocks_in(ctx.numel, block)
        if layout == ELIASFANO:
            block_ids = decode_ascending(data, low_width, nbits, kept, nblocks, cls.name)
        elif layout == BITMAP:
            if low_width or nbits:
                raise DecodeError("blocks: non-zero Elias-Fano parameters in a bitmap payload")
            expect_nbytes(data, _bits.packed_nbytes(nblocks), cls.name)
            block_ids = _bits.bitmap_positions(data, nblocks)
            if block_ids.numel() != kept:
                raise DecodeError(f"blocks: bitmap holds {block_ids.numel()} blocks, k={k} needs {kept}")
        else:
            raise DecodeError(f"blocks: unknown layout {layout}")
        if kept:
            if bool(block_ids[0] < 0) or int(block_ids[-1]) >= nblocks:
                raise DecodeError(f"blocks: block id out of range [0, {nblocks})")
            if not _bits.strictly_ascending(block_ids):
                raise DecodeError("blocks: block ids are not strictly ascending")
            if last_kept is not None and (int(block_ids[-1]) == nblocks - 1) != last_kept:
                raise DecodeError(f"blocks: k={k} and the last block's presence disagree")
        return expand_blocks(block_ids, block, ctx.numel)

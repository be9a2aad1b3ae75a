"""``rle`` index codec: run lengths of the d-bit membership bitmap.

Runs alternate 0-run, 1-run, 0-run, ... starting with a (possibly empty) 0-run; the
trailing 0-run is implied by d. All run lengths are bit-packed at the width of the
longest run. Runs come from the index gaps, so encoding never scans the d bits.
Good for clustered index sets (whole rows or channels selected); for scattered
top-k indices every 1-run has length 1 and Elias-Fano is smaller.
"""

from __future__ import annotations

import struct

import torch

from ... import _bits
from ...errors import DecodeError
from .. import CodecContext, IndexCodec, IndexEncoding, register_index_codec
from .._common import expect_nbytes, unpack_params

_PARAMS = "<QB"  # number of 1-runs, bit width of a run length


@register_index_codec
class RunLengthIndexCodec(IndexCodec):
    name = "rle"
    description = "run lengths of the membership bitmap, bit-packed; best for clustered indices"

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        k = indices.numel()
        if k == 0:
            return IndexEncoding(indices.new_empty(0, dtype=torch.uint8), struct.pack(_PARAMS, 0, 0), indices)
        # A new 1-run starts wherever the gap to the previous index is not 1.
        starts_mask = torch.ones(k, dtype=torch.bool, device=indices.device)
        starts_mask[1:] = indices[1:] != indices[:-1] + 1
        run_first = torch.nonzero(starts_mask).reshape(-1)  # position in `indices` of each run's start
        run_start = indices[run_first]
        run_end = torch.cat([run_first[1:], run_first.new_tensor([k])])
        ones = run_end - run_first
        prev_stop = torch.cat([run_start.new_zeros(1), (run_start + ones)[:-1]])
        zeros = run_start - prev_stop
        runs = torch.stack([zeros, ones], dim=1).reshape(-1)
        width = _bits.bit_length(int(runs.max()))
        return IndexEncoding(_bits.pack_fixed(runs, width), struct.pack(_PARAMS, run_first.numel(), width), indices)

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        nruns, width = unpack_params(_PARAMS, params, cls.name)
        if nruns > k:
            raise DecodeError(f"rle: {nruns} runs cannot hold {k} indices")
        if (nruns == 0) != (k == 0) or width > _bits.bit_length(ctx.numel) or (nruns and width == 0):
            raise DecodeError(f"rle: inconsistent run count {nruns} / bit width {width} for k={k}")
        expect_nbytes(data, _bits.fixed_nbytes(2 * nruns, width), cls.name)
        if nruns == 0:
            return torch.empty(0, dtype=torch.int64, device=data.device)
        runs = _bits.unpack_fixed(data, width, 2 * nruns).reshape(-1, 2)
        zeros, ones = runs[:, 0], runs[:, 1]
        if int(ones.sum()) != k or bool((ones == 0).any()):
            raise DecodeError(f"rle: 1-runs must be non-empty and sum to k={k}")
        if nruns > 1 and bool((zeros[1:] == 0).any()):
            raise DecodeError("rle: 0-runs between 1-runs must be non-empty")
        if int(runs.sum()) > ctx.numel:
            raise DecodeError(f"rle: runs cover more than numel={ctx.numel} positions")
        run_start = torch.cumsum(zeros + ones, 0) - ones
        first_of_run = torch.cumsum(ones, 0) - ones
        within = torch.arange(k, device=data.device) - torch.repeat_interleave(first_of_run, ones)
        return torch.repeat_interleave(run_start, ones) + within

"""Shared test helpers: build payloads from explicit parts, compare bit patterns, re-seal
payloads, a one-rank transport."""

from __future__ import annotations

import struct

import numpy as np
import torch

from deepreduce import wire
from deepreduce.codecs import CodecContext, make_index_codec, make_value_codec
from deepreduce.comm import Transport, completed

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (compares NaNs and signed zeros exactly)."""
    return tensor.contiguous().view(INT_VIEW[tensor.dtype])


def pack_parts(indices, values, numel, index="raw", value="raw", rng_seed=1234, index_params=None, value_params=None):
    """Encode explicit (indices, values) with the named codecs into a payload; also return what was sent."""
    ctx = CodecContext(numel, values.dtype, values.device, rng_seed)
    icodec = make_index_codec(index, index_params)
    vcodec = make_value_codec(value, value_params)
    ipart = icodec.encode(indices, ctx)
    vpart = vcodec.encode(values, ctx)
    payload = wire.pack(
        dtype=values.dtype, numel=numel, k=ipart.indices.numel(),
        index_codec_id=icodec.codec_id, value_codec_id=vcodec.codec_id,
        index=ipart, value=vpart, rng_seed=rng_seed,
    )
    return payload, ipart


def reseal(payload: torch.Tensor) -> torch.Tensor:
    """Recompute the CRC of a (possibly mutated) payload so validation goes past the checksum."""
    host = payload.clone().numpy()
    if host.size >= wire.HEADER_SIZE:
        host[56:60] = np.frombuffer(struct.pack("<I", wire._crc(host)), dtype=np.uint8)
    return torch.from_numpy(host)


def set_header_field(payload: torch.Tensor, offset: int, fmt: str, value: int) -> torch.Tensor:
    out = payload.clone()
    out[offset : offset + struct.calcsize(fmt)] = torch.tensor(list(struct.pack(fmt, value)), dtype=torch.uint8)
    return reseal(out)


HEADER_FIELDS = {  # name: (offset, struct format)
    "version": (4, "<B"),
    "sparsifier": (5, "<B"),
    "index_codec": (6, "<B"),
    "value_codec": (7, "<B"),
    "dtype": (8, "<B"),
    "flags": (9, "<B"),
    "index_params_len": (10, "<H"),
    "value_params_len": (12, "<H"),
    "numel": (16, "<Q"),
    "k": (24, "<Q"),
    "index_len": (32, "<Q"),
    "value_len": (40, "<Q"),
    "rng_seed": (48, "<Q"),
}



class SoloTransport(Transport):
    """A world of one rank, for in-process tests of the engine and its front ends."""

    rank = 0
    world_size = 1

    def allgather_sizes(self, nbytes: int) -> list[int]:
        return [nbytes]

    def allgather_async(self, payload: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        return completed([self._check_sizes(payload, sizes).clone()])

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        return completed(tensor)

    def barrier(self) -> None:
        pass

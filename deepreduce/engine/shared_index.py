"""Shared-index allreduce (ScaleCom's cyclic local top-k): per-rank bytes that stay flat in W.

The all-gather scheme moves every rank's payload to every rank, so each rank receives
W - 1 payloads and decodes W. Here one rank per bucket and step, the *leader*, picks the
index set from its own compensated gradient and broadcasts only the encoded indices;
every rank then contributes its own values at those indices to one dense allreduce of
k elements. Per compressed bucket, on every rank::

    leader = (step + key) mod W   key: the bucket's int key, or the CRC-32 of its name
                                  (deepreduce.rng.stream_key): rotates every step, and
                                  buckets of one step start from different ranks
    check the bucket is finite; clip_norm; compensate each compressed segment (error
    feedback, DGC momentum) -- small segments (numel < min_numel) travel dense
    the leader only: select each segment's indices (the compressor's sparsifier and index
    codec) and frame them into one index message
    one small all-gather of control words: the leader's message size; every rank's
    non-finite / failure flag; with fp16 values, every rank's largest exponent (the
    shared scale). The all-gather scheme makes the same blocking exchange (its sizes),
    so the flags cost no extra round trip.
    broadcast the leader's index message (its size known from the exchange); with several
    processes per node, once to each node and on inside it (SharedIndexScheme)
    every rank: its compensated values at those indices, divided by W, rounded to the wire
    dtype (the value codec: raw = the bucket's dtype, fp16 with the shared power-of-two
    scale, bf16); residual := compensated - those values as the sum carries them (the
    rounding included)
    allreduce the k values (the small segments ride along, or in a second allreduce in the
    bucket's dtype when the values travel in another); then the bucket is zero except the
    summed values at the indices and the small segments -- identical on every rank,
    because the allreduce result is

Why the message size is exchanged rather than bounded: a bound computable from
(numel, k) that holds for every index codec is the raw-index size (32 or 64 bits per
index), so broadcasting a buffer of that size would throw away what the index codec
saves; and the small exchange is needed anyway to carry every rank's non-finite and
failure flags before anyone commits to the sparse path.

A bucket whose gradient is not finite on any rank goes dense on every rank, with no
error-feedback update (the engine's non-finite policy). The leader falls back to a dense
allreduce (every rank learns it from the control words) when the broadcast plus the
value allreduce would move more than a dense allreduce of the bucket.

The index message carries a CRC-32 and the step; a receiver that cannot read it raises
:class:`~deepreduce.DecodeError` naming the leader (its peers, already in the value
allreduce, then fail at the process group's timeout).

Only value codecs whose sum is defined element by element can be used: ``raw``,
``fp16``, ``bf16``; only lossless index codecs (every rank must read the leader's set
exactly).
"""

from __future__ import annotations

import math
import struct
import time
import zlib
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import torch
import torch.distributed as dist

from .. import rng
from ..comm import Transport
from ..compressor import Compressor
from ..errors import ConfigError, DecodeError, DeepReduceError
from ..sparse import SparseGrad
from ..wire import pad8
from .framing import frame, unframe
from .memory import memory_dtype
from .messages import stream_name
from .nodes import NodeGroups, check_layout, resolve_node_size
from .presized import FAILED, NONFINITE
from .segments import Segment

if TYPE_CHECKING:
    from .pipeline import Engine

VALUE_CODECS = ("raw", "fp16", "bf16")  # the value codecs whose wire dtype can be summed
_DENSE = -3  # the leader's control word when the bucket should go dense

# Control word of a rank (one int64 in the size exchange): the leader's message size and the
# rank's largest exponent, or a negative flag.
_EXPONENT_BITS = 9
_EXPONENT_BIAS = 256  # frexp exponents of finite float32/float64 values lie within +-1100; clamped
_NO_EXPONENT = 0  # no values (all zero) or exponents not needed

# fp16 wire: the largest possible sum lands below 2^15, well inside float16's 65504.
_FP16_TARGET_EXPONENT = 15
_MAX_SHIFT = 120

# Index message: header, then one framed entry per compressed segment.
_MAGIC = b"DRSI"
_VERSION = 1
_HEAD = struct.Struct("<4sB3xI4xQ")  # magic, version, CRC-32 of the framed entries, step; 24 bytes keep entries aligned
_ENTRY = struct.Struct("<QQ")  # k, index codec parameter bytes; then params (padded to 8), index data


def shared_index_scheme(engine: Engine) -> "SharedIndexScheme":
    """The shared-index reducer for ``engine`` (ConfigError if its compressor does not suit)."""
    check_compressor(engine.compressor)
    if engine.small_compressor is not None:
        raise ConfigError("scheme 'shared_index' sums the tensors below min_numel densely in its allreduce; "
                          "small_compressor applies to scheme 'allgather' only")
    return SharedIndexScheme(engine)


class SharedIndexScheme:
    """The engine's ``scheme="shared_index"``: :func:`reduce_shared_index` over the engine's
    transport, called as ``scheme(buffer, segments, dense_bytes, key)``.

    With several processes per node the leader's index message crosses to each other node
    once, not once per rank: the leader sends it to the ranks of its own local rank on the
    other nodes, each of which passes it on inside its node. A plain broadcast to W ranks
    puts W - L copies on the links between nodes; this one N - 1 (L processes on each of N
    nodes). It is used when the transport is torch.distributed's default group, every rank
    was started by torchrun with the same ``LOCAL_WORLD_SIZE`` L (1 < L < W), and ranks are
    numbered node by node (``rank = GROUP_RANK * L + LOCAL_RANK``), as torchrun numbers
    them; otherwise the message travels by the transport's own broadcast. The ranks settle
    this together (one small all-gather) when the configuration is checked, or at the
    first compressed bucket; the same bytes arrive either way, so the results are the same.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.groups = None  # NodeGroups when the index message is relayed per node
        self._settled = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "groups": None, "_settled": False}  # process groups belong to one process

    def setup(self, world: Transport) -> None:
        """Decide, on every rank alike, whether to relay the index message per node (and make
        the sub-groups). Collective over ``world`` when it is torch.distributed's default group."""
        if self._settled:
            return
        self._settled = True
        from ..comm.torch_dist import TorchTransport

        if not isinstance(world, TorchTransport) or dist.get_world_size() != world.world_size:
            return  # another transport, or a sub-group: its own broadcast
        node_size = _torchrun_node_size(world.rank, world.world_size)
        proposals = world.allgather_sizes(node_size)
        if proposals[0] > 1 and len(set(proposals)) == 1:
            self.groups = NodeGroups(world, proposals[0])

    def __call__(self, buffer: torch.Tensor, segments: list[Segment], dense_bytes: int,
                 key: Hashable) -> torch.futures.Future:
        self.setup(self.engine.transport)
        broadcast = self._relay if self.groups is not None else None
        return reduce_shared_index(self.engine, buffer, segments, dense_bytes, key, broadcast=broadcast)

    def _relay(self, payload: torch.Tensor, root: int) -> torch.Tensor:
        """``root``'s ``payload`` on every rank: across nodes among the ranks of root's local
        rank, then inside each node from that rank."""
        groups = self.groups
        node, local = divmod(root, groups.node_size)
        if groups.local_rank == local:
            payload = groups.cross.broadcast_async(payload, node).wait()
        return groups.node.broadcast_async(payload, local).wait()


def _torchrun_node_size(rank: int, world_size: int) -> int:
    """The node size the hierarchical schemes would take from torchrun (``LOCAL_WORLD_SIZE``,
    ranks numbered node by node) when it makes several nodes of this world; else 0."""
    try:
        size = resolve_node_size(None)
        check_layout(rank, size)
    except ConfigError:
        return 0
    return size if 1 < size < world_size and world_size % size == 0 else 0


def check_compressor(compressor: Compressor) -> None:
    """ConfigError unless the leader's indices and a dense sum of the values are well defined."""
    value = type(compressor.value_codec).name
    if value not in VALUE_CODECS:
        raise ConfigError(
            f"scheme 'shared_index' sums the values in a dense allreduce; value codec {value!r} has no "
            f"element-wise sum. Use one of: {', '.join(VALUE_CODECS)} (or scheme 'allgather')"
        )
    index = type(compressor.index_codec)
    if not index.lossless:
        raise ConfigError(
            f"scheme 'shared_index' needs every rank to read the leader's index set exactly; index codec "
            f"{index.name!r} is lossy. Use a lossless one (raw, rle, eliasfano, zstd) or scheme 'allgather'"
        )


def leader_of(step: int, key: Hashable, world_size: int) -> int:
    """The rank that selects the indices of bucket ``key`` at ``step``: ``(step + key) mod W``,
    a name counting as its CRC-32. Every rank computes it; nothing is exchanged."""
    return (step + rng.stream_key(stream_name(key))) % world_size


def wire_dtype(value_codec: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the values of a ``dtype`` bucket are summed in for ``value_codec``."""
    return {"raw": dtype, "fp16": torch.float16, "bf16": torch.bfloat16}[value_codec]


def _control(size: int, exponent_field: int) -> int:
    return (size << _EXPONENT_BITS) | exponent_field


def _exponent_field(compensated: Sequence[torch.Tensor]) -> int:
    """This rank's largest exponent over ``compensated`` (frexp's, so |x| < 2^e), biased."""
    if not compensated:
        return _NO_EXPONENT
    largest = torch.stack([c.abs().amax() if c.numel() else c.new_zeros(()) for c in compensated]).amax()
    if not bool(largest > 0):
        return _NO_EXPONENT
    exponent = int(torch.frexp(largest.float() if largest.dtype != torch.float64 else largest).exponent)
    return min(max(exponent, 1 - _EXPONENT_BIAS), _EXPONENT_BIAS - 1) + _EXPONENT_BIAS


def _fp16_shift(fields: Sequence[int], world_size: int, average: bool) -> int:
    """The power of two every rank scales its fp16 values by: the largest sum any element can
    reach (the largest |value| over ranks, times W for a plain sum) lands below 2^15."""
    exponents = [f - _EXPONENT_BIAS for f in fields if f != _NO_EXPONENT]
    if not exponents:
        return 0
    headroom = 0 if average else math.ceil(math.log2(world_size))
    return max(-_MAX_SHIFT, min(_MAX_SHIFT, _FP16_TARGET_EXPONENT - max(exponents) - headroom))


def select_indices(compressor: Compressor, to_send: torch.Tensor, step: int, name: Hashable) -> tuple[torch.Tensor, torch.Tensor, bytes]:
    """The leader's selection for one segment: (ascending indices, encoded index bytes,
    codec parameters), with the random stream the all-gather scheme would use."""
    encoded = compressor.select_indices(to_send, step=step, key=stream_name(name))
    return encoded.indices, encoded.data.reshape(-1), encoded.params


def pack_message(step: int, entries: Sequence[tuple[int, torch.Tensor, bytes]], device: torch.device) -> torch.Tensor:
    """The index message: header + framed ``(k, index bytes, params)`` entries."""
    framed = []
    for k, data, params in entries:
        head = _ENTRY.pack(k, len(params)) + params + bytes(pad8(len(params)) - len(params))
        framed.append(torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device), data.to(device)]))
    body = frame(framed, device)
    crc = zlib.crc32(body.cpu().numpy())
    head = torch.frombuffer(bytearray(_HEAD.pack(_MAGIC, _VERSION, crc, step)), dtype=torch.uint8).to(device)
    return torch.cat([head, body])


def read_message(message: torch.Tensor, segments: Sequence[Segment], compressor: Compressor, dtype: torch.dtype,
                 step: int, leader: int) -> list[torch.Tensor]:
    """The indices of each compressed segment from the leader's index message; every
    inconsistency raises :class:`DecodeError` naming the leader (and the segment)."""
    source = f"index message from rank {leader}"
    if message.numel() < _HEAD.size:
        raise DecodeError(f"{source}: {message.numel()} bytes cannot hold the {_HEAD.size}-byte header")
    magic, version, crc, sent_step = _HEAD.unpack(message[: _HEAD.size].cpu().numpy().tobytes())
    if magic != _MAGIC or version != _VERSION:
        raise DecodeError(f"{source}: not a version-{_VERSION} shared-index message (magic {magic!r}, version {version})")
    body = message[_HEAD.size :]
    if zlib.crc32(body.cpu().numpy()) != crc:
        raise DecodeError(f"{source}: checksum mismatch")
    if sent_step != step:
        raise DecodeError(f"{source}: made at step {sent_step}, this rank is at step {step} (do all ranks step together?)")
    entries = unframe(body, len(segments), source)
    out = []
    for seg, entry in zip(segments, entries):
        where = f"{source}, segment {seg.name!r}"
        if entry.numel() < _ENTRY.size:
            raise DecodeError(f"{where}: {entry.numel()} bytes cannot hold the entry header")
        k, params_len = _ENTRY.unpack(entry[: _ENTRY.size].cpu().numpy().tobytes())
        start = _ENTRY.size + pad8(params_len)
        if k > seg.numel or start > entry.numel():
            raise DecodeError(f"{where}: k={k} of numel={seg.numel} with {params_len} parameter bytes in a {entry.numel()}-byte entry")
        params = entry[_ENTRY.size : _ENTRY.size + params_len].cpu().numpy().tobytes()
        data = entry[start:]
        if data.storage_offset() % 8:
            data = data.clone()  # codecs view their bytes as wider types
        try:
            indices = compressor.decode_indices(data, params, k, seg.numel, dtype, step=step, key=stream_name(seg.name))
        except DecodeError as exc:
            raise DecodeError(f"{where}: {exc}") from exc
        out.append(indices)
    return out


def reduce_shared_index(engine: Engine, buffer: torch.Tensor, segments: list[Segment], dense_bytes: int,
                        key: Hashable, transport: Transport | None = None, finite: bool | None = None,
                        broadcast: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.futures.Future:
    """One compressed bucket through the shared-index scheme (see the module docstring).
    Issues every collective before returning; the future completes with ``buffer``.
    ``transport``: the ranks to reduce over (default: the engine's; the hierarchical
    scheme passes the ranks of one local rank across nodes). ``finite``: whether to treat
    the bucket as finite (default: checked here). ``broadcast(payload, root)``: how the
    index message reaches every rank, blocking (default: the transport's broadcast)."""
    transport = transport or engine.transport
    world, rank, step = transport.world_size, transport.rank, engine.step
    leader = leader_of(step, key, world)
    started = time.perf_counter()
    compressor = engine._step_compressor()
    codec = type(compressor.value_codec).name
    wire = wire_dtype(codec, buffer.dtype)
    small = [seg for seg in segments if seg.numel < engine.min_numel]
    large = [seg for seg in segments if seg.numel >= engine.min_numel]
    pending: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # per segment: (compensated, to_send)
    selection: list[tuple[torch.Tensor, torch.Tensor, bytes]] = []
    message = None
    # One pass; a host sync on CUDA, as the control exchange below is anyway.
    if not (bool(torch.isfinite(buffer).all()) if finite is None else finite):
        code = NONFINITE
    else:
        try:
            if engine.clip_norm is not None:
                engine._clip(buffer)
            for seg in segments:
                if seg.numel < engine.min_numel:
                    pending.append(None)
                    continue
                compensated = engine.memory.compensate(seg.name, buffer.narrow(0, seg.offset, seg.numel), seg.parts)
                to_send = compensated.to(buffer.dtype)  # selected and sent in the bucket's dtype, as the all-gather does
                pending.append((compensated, to_send))
                if rank == leader:
                    selection.append(select_indices(compressor, to_send, step, seg.name))
            sent = [entry[1] for entry in pending if entry is not None]
            field = _exponent_field(sent) if codec == "fp16" else _NO_EXPONENT
            code = _control(0, field)
            if rank == leader:
                message = pack_message(step, [(idx.numel(), data, params) for idx, data, params in selection], buffer.device)
                k = sum(idx.numel() for idx, _, _ in selection)
                small_bytes = sum(seg.numel for seg in small) * buffer.element_size()
                traffic = message.numel() + 2 * (k * wire.itemsize + small_bytes)
                dense = engine.dense_fallback and traffic > 2 * dense_bytes
                code = _DENSE if dense else _control(message.numel(), field)
        except Exception:
            # Tell the other ranks, or they would wait for this rank's word until timeout.
            engine._allgather_sizes(FAILED, key, transport)
            raise
    encoded = time.perf_counter()
    codes = engine._allgather_sizes(code, key, transport)
    if FAILED in codes:
        failed = ", ".join(str(r) for r, n in enumerate(codes) if n == FAILED)
        raise DeepReduceError(f"deepreduce: rank {failed} failed to compress bucket {key!r} at step {step} (see its error)")
    if NONFINITE in codes:
        return engine._nonfinite(buffer, segments, pending, codes, key, dense_bytes, transport)
    if codes[leader] == _DENSE:
        for seg, entry in zip(segments, pending):
            if entry is not None:
                compensated, to_send = entry
                buffer.narrow(0, seg.offset, seg.numel).copy_(to_send)
                engine.memory.update_dense(seg.name, compensated, to_send)
        engine._stats.add(dense_fallbacks=1, sent_bytes=dense_bytes, compress_s=encoded - started,
                          exchange_s=time.perf_counter() - encoded)
        return engine._allreduce(buffer, key, transport)
    size = codes[leader] >> _EXPONENT_BITS
    shift = _fp16_shift([c & ((1 << _EXPONENT_BITS) - 1) for c in codes], world, engine.average) if codec == "fp16" else 0

    if large:
        # The receivers size their buffer from the exchanged control word, not from a bound
        # over (numel, k): a bound valid for every index codec is the raw-index size, which
        # would throw away what the codec saves (see the module docstring).
        if rank == leader:
            received = message
        else:
            received = torch.empty(size, dtype=torch.uint8, device=buffer.device)
        try:
            if broadcast is None:
                received = transport.broadcast_async(received, leader).wait()
            else:
                received = broadcast(received, leader)
        except Exception as exc:
            raise engine._failed("the index broadcast", key, step, exc) from exc
    exchanged = time.perf_counter()
    if rank == leader or not large:
        indices = [idx for idx, _, _ in selection]
    else:
        indices = read_message(received, large, compressor, buffer.dtype, step, leader)

    # This rank's values at the leader's indices, as the sum will carry them.
    compute = memory_dtype(buffer.dtype)
    divisor = world if engine.average else 1
    sent_values = [entry[1][idx] for entry, idx in zip((e for e in pending if e is not None), indices)]
    values = torch.cat(sent_values) if sent_values else buffer.new_empty(0)
    # Divided by W first, as the dense allreduce does; the power-of-two scale is exact.
    contribution = (values.to(compute) / divisor * 2.0**shift).to(wire)
    own = contribution.to(compute) * 2.0**-shift * divisor  # what the sum holds of this rank, undivided
    offset = 0
    for seg, entry, idx in zip(large, (e for e in pending if e is not None), indices):
        engine.memory.update(seg.name, entry[0], SparseGrad(idx, own[offset : offset + idx.numel()], seg.numel))
        offset += idx.numel()
    kept = offset
    positions = torch.cat([idx + seg.offset for seg, idx in zip(large, indices)]) if large else values.new_empty(0, dtype=torch.int64)

    # Small segments: dense, in the bucket's dtype, divided first as the dense allreduce does.
    dense_part = torch.cat([buffer.narrow(0, seg.offset, seg.numel) for seg in small]) if small else buffer.new_empty(0)
    if engine.average:
        dense_part = dense_part / world
    merged = wire == buffer.dtype and shift == 0  # one allreduce carries both
    tensors = [torch.cat([contribution, dense_part])] if merged else [contribution, dense_part]
    sent_bytes = (size if large else 0) + sum(t.numel() * t.element_size() for t in tensors)
    engine._stats.add(
        compressed_buckets=1, sent_bytes=sent_bytes, payload_bytes=sent_bytes, broadcast_bytes=size if large else 0,
        numel=buffer.numel(),
        kept=kept + dense_part.numel(), compress_s=time.perf_counter() - started - (exchanged - encoded),
        exchange_s=exchanged - encoded,
    )
    futures = []
    try:
        for tensor in tensors:
            if tensor.numel():  # every rank knows the lengths: all skip an empty one alike
                futures.append(transport.allreduce_async(tensor))
    except Exception as exc:
        raise engine._failed("the value allreduce", key, step, exc) from exc

    def finish(done: torch.futures.Future) -> torch.Tensor:
        try:
            for future in done.value():
                future.value()
        except Exception as exc:
            raise engine._failed("the value allreduce", key, step, exc) from exc
        began = time.perf_counter()
        summed = tensors[0]
        buffer.zero_()
        buffer.index_copy_(0, positions, (summed[:kept].to(compute) * 2.0**-shift).to(buffer.dtype))
        rest = summed[kept:] if merged else tensors[1]
        at = 0
        for seg in small:
            buffer.narrow(0, seg.offset, seg.numel).copy_(rest[at : at + seg.numel])
            at += seg.numel
        engine._stats.add(decompress_s=time.perf_counter() - began)
        return buffer

    return torch.futures.collect_all(futures).then(finish)

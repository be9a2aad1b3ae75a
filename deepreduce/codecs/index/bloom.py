"""``bloom`` index codec (DeepReduce): a Bloom filter of the ``r`` selected indices.

The sender inserts its ``r`` indices into a filter of ``m`` bits with ``h`` hashes,
``h = ceil(log2(1/fpr))`` and ``m = ceil(h*r / ln 2)`` (about ``1.44*log2(1/fpr)`` bits
per index; the default ``fpr`` is ``0.1*r/d``). Receivers
query all ``d`` positions and get the positive set ``P`` (the ``r`` true indices plus
about ``fpr*(d-r)`` false positives, ascending). A *policy*, run identically on both
sides, picks the set ``S`` that values are sent for:

- ``p0``: ``S = P`` -- nothing lost, ``|P| - r`` extra values are sent;
- ``leftmost``: the first ``r`` elements of ``P``;
- ``random``: ``r`` elements of ``P`` drawn from the payload's private random stream;
- ``p2``: conflict sets -- every set bit was set by some true index, so a bit whose
  set of positives is a singleton names a certain true index; bits are explained
  smallest set first, choosing one member per unexplained bit, until ``r`` are chosen.

The encoder returns ``S`` and the compressor reads the values at ``S`` from the dense
gradient, so false positives carry their own true values (no misalignment) and
true indices left out of ``S`` stay in the error-feedback residual.

Hashes are computed on the fly (keyed fmix32 + double hashing, see ``_hashing``), keyed by
the payload's random-stream seed so false positives move from step to step. The
query tests hash ``i`` only on the positions that passed hashes ``0..i-1`` and walks
the ``d`` positions in fixed-size chunks, so its memory does not grow with ``d``.

Tuning: ``p0`` keeps the whole top-k but sends ~``fpr*d`` extra values; ``p2`` keeps
nearly all of its mass at exactly ``r`` values; ``random`` loses more. A smaller ``fpr``
costs ``1.44*log2(1/fpr)`` bits per index and one more hash per query position. At the
default ``fpr`` the filter is larger than the lossless ``eliasfano`` index (about
``log2(d/r) + 2`` bits), so prefer that unless reproducing DeepReduce. Decoding queries
all ``d`` positions once per payload, on every rank for every rank's payload: the
slowest index codec to decode (``benchmarks/RESULTS.md`` has the timings).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch

from ... import _bits
from ...errors import ConfigError, DecodeError
from ...options import Option, probability
from .. import CodecContext, IndexCodec, IndexEncoding, PartSize, register_index_codec
from .. import _hashing
from .._common import expect_nbytes, unpack_params

_PARAMS = "<QQBB"  # r, filter bits m, hashes h, policy code
POLICIES = ("p0", "leftmost", "random", "p2")
_POLICY_CODES = {name: code for code, name in enumerate(POLICIES)}
MAX_HASHES = 64
# Above this many hashes a filter costs more than raw int32 indices (h / ln 2 > 32 bits each).
MAX_USEFUL_HASHES = int(32 * math.log(2))
MIN_FPR = 2.0 ** -MAX_USEFUL_HASHES
POSITIONS_PER_BIT = 1 << 12  # the filter has at least d / 2^12 bits: bounds query work per payload byte
_CHUNK = 1 << 20  # positions per query chunk (~20 MB of buffers)
# On a GPU each hash's survivor compaction waits for the device, so fewer, larger chunks
# pay: 25.6 M positions took 42 ms in 1 M chunks on an H100 (~375 waits).
_CHUNK_CUDA = 1 << 23  # ~150 MB of buffers
_HASH_SALT = 0x424C4F4F4D  # "BLOOM"
_RANDOM_SALT = 0x424C5031  # "BLP1"
_CONFLICT_SALT = 0x424C5032  # "BLP2"
_MAX_SWEEPS = 16
_MAX_ROUNDS = 256
# random and p2 choose r of the positives; past 256 positives per index (fpr above ~256x the
# density) nearly every choice is a false positive, and the choosing costs ~100 bytes and
# ~0.3 us per positive. Filters beyond this are refused on both sides, which keeps the
# decoder's memory within ~2 K positives per payload byte (r <= 8 bits per byte) instead of
# growing with numel (a forged 1.8 KB payload took 12 s and 2.6 GB before).
SELECT_POSITIVES_PER_INDEX = 256
SELECT_POSITIVES_SLACK = 1 << 16


class _TooManyPositives(Exception):
    pass


def default_fpr(r: int, d: int) -> float:
    """``0.1 * r / d``: about ``0.1 * r`` false positives over the tensor; never below
    :data:`MIN_FPR`, where the filter would outgrow raw indices."""
    return max(0.1 * r / d, MIN_FPR) if d else 0.1


def hash_count(fpr: float) -> int:
    """``h = ceil(log2(1/fpr))``, within ``[1, 64]``."""
    return min(MAX_HASHES, max(1, math.ceil(math.log2(1.0 / fpr))))


def filter_bits(r: int, nhashes: int, d: int) -> int:
    """``m = ceil(h*r / ln 2)``, and at least ``d / 2^12`` bits; 0 for an empty set.

    The floor caps the positions a receiver must query at 2^12 per filter bit (32 K per
    payload byte), whatever the header claims; it only binds below ~0.001 % density."""
    if r == 0:
        return 0
    return max(math.ceil(nhashes * r / math.log(2)), -(-d // POSITIONS_PER_BIT))


def query(table: torch.Tensor, d: int, key: int, nhashes: int, limit: int | None = None, stop_after: int | None = None) -> torch.Tensor:
    """Positive set ``P`` of the filter ``table`` (one bool per bit) over ``[0, d)``, ascending.

    Positions are walked in chunks of ``_CHUNK`` (``_CHUNK_CUDA`` on a GPU; powers of two,
    so a chunk never straddles a multiple of 2^32 and shares one pair of high keys). Hash ``i`` is
    tested only on the positions that passed hashes ``0..i-1`` (half of them pass
    each hash of a well-sized filter). Raises :class:`_TooManyPositives` once more
    than ``limit`` positives are found; returns early once ``stop_after`` are found."""
    nbits = table.numel()
    device = table.device
    step = _CHUNK if device.type == "cpu" else _CHUNK_CUDA
    chunk = max(1, min(step, d))
    offsets = torch.arange(chunk, dtype=torch.int32, device=device)
    mixed = torch.empty(chunk, dtype=torch.int32, device=device)
    scratch = torch.empty_like(mixed)
    wide = torch.empty(chunk, dtype=torch.int64, device=device)
    hit = torch.empty(chunk, dtype=torch.bool, device=device)
    found: list[torch.Tensor] = []
    count = 0
    for start in range(0, d, step):
        n = min(chunk, d - start)
        h1, tmp, bit, passed = mixed[:n], scratch[:n], wide[:n], hit[:n]
        k2 = _hashing.first_hashes_into(start, offsets[:n], key, h1, tmp)
        # Hash 0 on every position: bit = (h1 * m) >> 32.
        bit.copy_(h1).bitwise_and_(_hashing.MASK32).mul_(nbits).bitwise_right_shift_(32)
        torch.index_select(table, 0, bit, out=passed)
        kept = [_bits.true_positions(passed)]
        g = h1.index_select(0, kept[0])
        step = _hashing.second_hashes(g, k2)
        for _ in range(1, nhashes):
            if g.numel() == 0:
                break
            g.add_(step)  # int32 addition wraps: g_i = h1 + i*h2 mod 2^32
            kept.append(_bits.true_positions(table.index_select(0, _hashing.bit_of(g, nbits))))
            g, step = g.index_select(0, kept[-1]), step.index_select(0, kept[-1])
        # Survivors' chunk offsets: compose the per-hash selections from the last one back.
        alive = kept.pop()
        while kept:
            alive = kept.pop().index_select(0, alive)
        found.append(alive + start)
        count += alive.numel()
        if limit is not None and count > limit:
            raise _TooManyPositives(count)
        if stop_after is not None and count >= stop_after:
            break
    if not found:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(found)


def select_limit(r: int) -> int:
    """Most positives the ``random`` and ``p2`` policies choose among (see ``SELECT_POSITIVES_PER_INDEX``)."""
    return SELECT_POSITIVES_PER_INDEX * r + SELECT_POSITIVES_SLACK


def positive_limit(table_popcount: int, nbits: int, nhashes: int, r: int, d: int) -> int:
    """Most positives a genuine filter can plausibly have: ``r`` plus a wide margin over the
    expected false positives ``rho^h * (d - r)`` (``rho`` = fraction of bits set).

    The decoder stops there, so a crafted filter cannot make it hold ``d`` positions."""
    expected = (table_popcount / nbits) ** nhashes * (d - r)
    return min(d, r + math.ceil(4 * expected + 16 * math.sqrt(expected)) + 1024)


# --- policies ---------------------------------------------------------------------------


def _leftmost(positives: torch.Tensor, r: int, ctx: CodecContext, key: int, nhashes: int, nbits: int) -> torch.Tensor:
    return positives[:r]


def _all(positives: torch.Tensor, r: int, ctx: CodecContext, key: int, nhashes: int, nbits: int) -> torch.Tensor:
    return positives


def _random(positives: torch.Tensor, r: int, ctx: CodecContext, key: int, nhashes: int, nbits: int) -> torch.Tensor:
    return positives.index_select(0, _hashing.random_subset(ctx.rng_seed, _RANDOM_SALT, positives.numel(), r, positives.device))


def _where(mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``[t[mask] for t in tensors]`` via one fast positions pass."""
    picked = _bits.true_positions(mask)
    return [t.index_select(0, picked) for t in tensors]


def _greedy_sweep(pair_member: torch.Tensor, pair_set: torch.Tensor, candidate: torch.Tensor, order_key: torch.Tensor, npositives: int) -> torch.Tensor:
    """Set indices that choose their candidate in one sequential sweep, in visiting order.

    Sets are visited in increasing ``order_key`` (unique, and every one-member set
    before every larger set: smallest first); a set is skipped when a set visited
    before it chose one of its members (the pairs ``pair_member``/``pair_set``), else
    it chooses ``candidate[set]``.

    One-member sets are resolved at once: each member's first such set chooses it,
    and every larger set holding one of those members is explained. The rest is
    replayed in parallel rounds: a set is decided once no earlier undecided set
    could still choose one of its members. Sets still undecided after
    ``_MAX_ROUNDS`` rounds choose nothing in this sweep."""
    device = pair_member.device
    nsets = candidate.numel()
    never = torch.iinfo(torch.int64).max
    chosen_at = torch.full((npositives,), never, dtype=torch.int64, device=device)  # key of the set that chose it
    size = torch.bincount(pair_set, minlength=nsets)
    alone = size.index_select(0, pair_set) == 1
    single_member, single_set = _where(alone, pair_member, pair_set)
    single_key = order_key.index_select(0, single_set)
    chosen_at.scatter_reduce_(0, single_member, single_key, reduce="amin")
    (first_single,) = _where(single_key == chosen_at.index_select(0, single_member), single_set)
    active: list[torch.Tensor] = [first_single]
    pair_member, pair_set = _where(~alone, pair_member, pair_set)
    certain = torch.full((nsets,), never, dtype=torch.int64, device=device)
    certain.scatter_reduce_(0, pair_set, chosen_at.index_select(0, pair_member), reduce="amin")
    (undecided,) = _where((size > 1) & (certain == never), torch.arange(nsets, device=device))
    still = torch.zeros(nsets, dtype=torch.bool, device=device)
    still[undecided] = True
    pair_member, pair_set = _where(still.index_select(0, pair_set), pair_member, pair_set)
    for _ in range(_MAX_ROUNDS):
        if undecided.numel() == 0:
            break
        keys = order_key.index_select(0, undecided)
        # Earliest key that may still choose each positive: its chooser, or an undecided candidate.
        earliest = chosen_at.clone().scatter_reduce_(0, candidate.index_select(0, undecided), keys, reduce="amin")
        slot = torch.full((nsets,), never, dtype=torch.int64, device=device)
        first_possible = slot.clone().scatter_reduce_(0, pair_set, earliest.index_select(0, pair_member), reduce="amin")
        # No earlier set can choose any member (so none did): the set chooses its candidate.
        free = first_possible.index_select(0, undecided) >= keys
        newly, waiting, waiting_keys = _where(free, undecided) + _where(~free, undecided, keys)
        if newly.numel():
            chosen_at.scatter_reduce_(0, candidate.index_select(0, newly), order_key.index_select(0, newly), reduce="amin")
            active.append(newly)
        # A member chosen by an earlier set (this round's choices included) explains the set.
        first_chosen = slot.scatter_reduce_(0, pair_set, chosen_at.index_select(0, pair_member), reduce="amin")
        (undecided,) = _where(first_chosen.index_select(0, waiting) >= waiting_keys, waiting)
        still = torch.zeros(nsets, dtype=torch.bool, device=device)
        still[undecided] = True
        pair_member, pair_set = _where(still.index_select(0, pair_set), pair_member, pair_set)
    sets = torch.cat(active)
    return sets.index_select(0, torch.sort(order_key.index_select(0, sets)).indices)


def _pairs(positives: torch.Tensor, key: int, nhashes: int, nbits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(member, set) pairs: positive ``member`` hashes to the filter bit numbered ``set``
    (bits renumbered densely); a position whose hashes repeat a bit joins that set once."""
    device = positives.device
    n = positives.numel()
    bits = _hashing.all_bits(positives, key, nhashes, nbits)
    repeated = torch.zeros_like(bits, dtype=torch.bool)
    for j in range(1, nhashes):
        repeated[:, j] = (bits[:, :j] == bits[:, j : j + 1]).any(dim=1)
    member = torch.arange(n, device=device).unsqueeze(1).expand_as(bits).reshape(-1)
    member, bits = _where(~repeated.reshape(-1), member, bits.reshape(-1))
    used = torch.zeros(nbits, dtype=torch.bool, device=device)
    used[bits] = True
    dense = torch.cumsum(used, 0) - 1
    return member, dense.index_select(0, bits), int(dense[-1]) + 1


def _conflict_sets(positives: torch.Tensor, r: int, ctx: CodecContext, key: int, nhashes: int, nbits: int) -> torch.Tensor:
    device = positives.device
    n = positives.numel()
    member, set_id, nsets = _pairs(positives, key, nhashes, nbits)
    set_index = torch.arange(nsets, device=device)
    member_bits = max(1, n.bit_length())
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    picked: list[torch.Tensor] = []
    total = 0
    for sweep in range(_MAX_SWEEPS):
        if total >= r:
            break
        pair_member, pair_set = _where(~chosen.index_select(0, member), member, set_id)
        if pair_member.numel() == 0:
            break
        size = torch.bincount(pair_set, minlength=nsets).clamp_(max=(1 << 11) - 1)
        # Visiting order: smallest set first, ties in random order (then by set number,
        # which keeps keys unique). Comparing keys is all the sweep needs, no sort.
        # Random draws are counter-based hashes, the same on every device (see _hashing.random_words).
        tie = _hashing.random_words(ctx.rng_seed, _CONFLICT_SALT + 2 * sweep, nsets, device) >> 11
        order_key = (size << 52) | (tie << 31) | set_index
        # Each set's candidate: the member whose pair drew the smallest random number
        # (the draw sits above the member number, so one min finds both).
        draw = _hashing.random_words(ctx.rng_seed, _CONFLICT_SALT + 2 * sweep + 1, pair_member.numel(), device)
        best = torch.full((nsets,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
        best.scatter_reduce_(0, pair_set, (draw << member_bits) | pair_member, reduce="amin")
        candidate = best & ((1 << member_bits) - 1)
        winners = candidate.index_select(0, _greedy_sweep(pair_member, pair_set, candidate, order_key, n))
        winners = winners[: r - total]
        chosen[winners] = True
        picked.append(winners)
        total += winners.numel()
    if total < r:
        # Only reached after many sweeps (tiny h, crowded sets): fill up at random.
        rest = _bits.true_positions(~chosen)
        extra = rest.index_select(0, _hashing.random_subset(ctx.rng_seed, _CONFLICT_SALT - 1, rest.numel(), r - total, device))
        chosen[extra] = True
    return positives.index_select(0, _bits.true_positions(chosen))


_SELECT = {"p0": _all, "leftmost": _leftmost, "random": _random, "p2": _conflict_sets}


def _select(policy: str, table: torch.Tensor, r: int, d: int, key: int, nhashes: int, ctx: CodecContext, count: int | None) -> torch.Tensor:
    """Query the filter and apply the policy; ``count`` is the decoder's expected |P| for p0."""
    nbits = table.numel()
    if policy == "leftmost":
        positives = query(table, d, key, nhashes, stop_after=r)
    elif policy == "p0" and count is not None:
        positives = query(table, d, key, nhashes, limit=count)
    else:
        limit = positive_limit(int(torch.count_nonzero(table)), nbits, nhashes, r, d)
        if policy != "p0":
            limit = min(limit, select_limit(r))
        positives = query(table, d, key, nhashes, limit=limit)
    if positives.numel() < r:
        raise DecodeError(f"bloom: filter has {positives.numel()} positives, fewer than r={r}")
    return _SELECT[policy](positives, r, ctx, key, nhashes, nbits)


@register_index_codec
class BloomIndexCodec(IndexCodec):
    name = "bloom"
    description = "Bloom filter of the indices (DeepReduce); policy p0|leftmost|random|p2 picks the sent set"
    lossless = False
    options = (
        Option("fpr", float, None, "false-positive rate; default 0.1*r/d (~0.1*r false positives)", check=probability, check_text="must be in (0, 1)"),
        Option("policy", str, "p0", "which positives get values: p0 all, leftmost / random / p2 exactly r", choices=POLICIES),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        fpr = self.config["fpr"]
        if fpr is not None and hash_count(fpr) > MAX_USEFUL_HASHES:
            raise ConfigError(
                f"bloom: fpr={fpr:g} needs {hash_count(fpr)} hashes, {hash_count(fpr) / math.log(2):.1f} bits per index: "
                f"a filter larger than raw int32 indices (32 bits); use fpr >= {MIN_FPR:.2g} or a lossless index codec"
            )

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        r, d = indices.numel(), ctx.numel
        policy = self.config["policy"]
        if r == 0:
            return IndexEncoding(indices.new_empty(0, dtype=torch.uint8), struct.pack(_PARAMS, 0, 0, 0, _POLICY_CODES[policy]), indices)
        fpr = self.config["fpr"] if self.config["fpr"] is not None else default_fpr(r, d)
        nhashes = hash_count(fpr)
        nbits = filter_bits(r, nhashes, d)
        if nbits > _hashing.MAX_FILTER_BITS:
            raise ValueError(f"bloom: a filter of {nbits} bits for r={r} exceeds 2^31-1 bits; use smaller buckets or a larger fpr")
        key = _hashing.hash_key(ctx.rng_seed, _HASH_SALT)
        table = torch.zeros(nbits, dtype=torch.bool, device=indices.device)
        table[_hashing.all_bits(indices, key, nhashes, nbits).reshape(-1)] = True
        try:
            chosen = _select(policy, table, r, d, key, nhashes, ctx, None)
        except _TooManyPositives as exc:
            if policy != "p0" and exc.args[0] > select_limit(r):
                raise ConfigError(
                    f"bloom: the filter yields more than {select_limit(r)} positives for r={r} indices, the most policy "
                    f"{policy} chooses among: use a smaller fpr (or policy p0)"
                ) from None
            # ~never: the limit is many standard deviations wide
            raise RuntimeError(f"bloom: {exc.args[0]} positives exceed the decoder's plausibility limit") from None
        data = _bits.pack_bitmap(_bits.true_positions(table), nbits)
        return IndexEncoding(data, struct.pack(_PARAMS, r, nbits, nhashes, _POLICY_CODES[policy]), chosen)

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize | None:
        if self.config["policy"] == "p0":
            return None  # sends every positive: k depends on the data
        if k == 0:
            return PartSize(0, struct.calcsize(_PARAMS))
        fpr = self.config["fpr"] if self.config["fpr"] is not None else default_fpr(k, numel)
        return PartSize(_bits.packed_nbytes(filter_bits(k, hash_count(fpr), numel)), struct.calcsize(_PARAMS))

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        r, nbits, nhashes, code = unpack_params(_PARAMS, params, cls.name)
        d = ctx.numel
        if code >= len(POLICIES):
            raise DecodeError(f"bloom: unknown policy code {code}")
        policy = POLICIES[code]
        if r == 0:
            if nbits or nhashes or k:
                raise DecodeError(f"bloom: empty filter must have m=0, h=0, k=0 (got m={nbits}, h={nhashes}, k={k})")
            expect_nbytes(data, 0, cls.name)
            return torch.empty(0, dtype=torch.int64, device=data.device)
        if r > d:
            raise DecodeError(f"bloom: r={r} exceeds numel={d}")
        if not 1 <= nhashes <= MAX_HASHES:
            raise DecodeError(f"bloom: hash count h={nhashes} outside [1, {MAX_HASHES}]")
        if nbits != filter_bits(r, nhashes, d) or nbits > _hashing.MAX_FILTER_BITS:
            raise DecodeError(f"bloom: filter size m={nbits} does not match r={r}, h={nhashes}, numel={d}")
        if (k < r) if policy == "p0" else (k != r):
            raise DecodeError(f"bloom: header k={k} impossible for policy {policy} with r={r}")
        expect_nbytes(data, _bits.packed_nbytes(nbits), cls.name)
        bits = _bits.bitmap_to_bool(data, 8 * data.numel())
        if bool(bits[nbits:].any()):
            raise DecodeError("bloom: padding bits after the filter must be zero")
        table = bits[:nbits].contiguous()
        popcount = int(torch.count_nonzero(table))
        if not 1 <= popcount <= r * nhashes:
            raise DecodeError(f"bloom: {popcount} bits set; {r} indices with {nhashes} hashes set 1..{r * nhashes}")
        key = _hashing.hash_key(ctx.rng_seed, _HASH_SALT)
        try:
            chosen = _select(policy, table, r, d, key, nhashes, ctx, k if policy == "p0" else None)
        except _TooManyPositives as exc:
            raise DecodeError(f"bloom: filter yields more than {exc.args[0] - 1} positives (implausible for r={r})") from None
        if chosen.numel() != k:
            raise DecodeError(f"bloom: policy {policy} selected {chosen.numel()} indices, header says k={k}")
        return chosen

"""``Compressor``: a sparsifier, an index codec and a value codec behind one call, in
both directions.

    c = Compressor(ratio=0.01, sparsifier="topk", index="eliasfano", value="fp16")
    payload = c.compress(grad)          # 1-D uint8 tensor on grad's device
    sg = c.decompress(payload)          # SparseGrad, same as deepreduce.decode(payload)

Encoding is the same for every codec: select -> encode indices (the codec returns the
index set the receivers will decode, which a lossy codec may change) -> read the values
at exactly those positions from the dense tensor -> encode values -> frame
(:func:`deepreduce.wire.pack`). Decoding reads and validates the header
(:func:`deepreduce.wire.read_header`), decodes the values first (their length bounds
``k`` before any index decoder allocates for it), then the indices, and checks them.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from . import _bits, rng, wire
from .codecs import INDEX_CODECS, VALUE_CODECS, CodecContext, IndexCodec, IndexEncoding, ValueCodec, make_index_codec, make_value_codec
from .phases import PhaseTimer, mark
from .scratch import Scratch
from .errors import ConfigError, DecodeError
from .options import resolve_options
from .sparse import SparseGrad
from .sparsifiers import SelectContext, get_sparsifier, select_with, target_k


@dataclass(frozen=True)
class Compressed:
    """One compressed tensor: the payload, and exactly what every receiver will decode
    from it (the sender subtracts this from its error-feedback residual)."""

    payload: torch.Tensor
    sent: SparseGrad
    selected: int  # elements the sparsifier picked (before a lossy index codec changed the set)


def _parse_segment(segment: str, what: str) -> tuple[str, list[str], dict[str, str]]:
    name, _, rest = segment.strip().partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"spec: empty {what} name in {segment!r}")
    positional, named = [], {}
    for arg in filter(None, (a.strip() for a in rest.split(","))):
        key, eq, value = arg.partition("=")
        if eq:
            if key.strip() in named:
                raise ConfigError(f"spec: {what} {name!r} gives {key.strip()!r} twice in {segment!r}")
            named[key.strip()] = value.strip()
        else:
            positional.append(arg)
    return name, positional, named


class Compressor:
    """Sparsify + encode a gradient into one self-describing payload, and decode it back.

    Args:
        ratio: fraction of elements kept (density), in [0, 1].
        sparsifier: ``topk`` | ``threshold`` | ``randomk`` | ``mstopk`` | ``dgc`` | ``cyclic`` | ``blocktopk``.
        index: index codec name (``deepreduce codecs`` lists them).
        value: value codec name.
        seed: seeds the private (seed, step, bucket) random streams used by random
            choices (randomk, Bloom policies, stochastic rounding). Ranks must agree.
        sparsifier_options / index_options / value_options: options per component.
        **options: options routed by name to every component that declares them
            (e.g. ``fpr=1e-3, policy="p2", degree=5, bits=8, level=3``).

    Tuning: at 1 % density ``eliasfano`` + ``fp16`` costs ~24 bits per kept element
    (vs 64 for raw top-k); ``qsgd`` values bring it to ~16 with a bounded, unbiased
    error; a Bloom filter index (``bloom``) is smaller still but is lossy.
    """

    def __init__(
        self,
        ratio: float = 0.01,
        sparsifier: str = "topk",
        index: str = "eliasfano",
        value: str = "fp16",
        *,
        seed: int = 0,
        sparsifier_options: Mapping[str, Any] | None = None,
        index_options: Mapping[str, Any] | None = None,
        value_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        for old in ("sparsifier_params", "index_params", "value_params"):
            if old in options:  # the keywords' former names
                warnings.warn(f"Compressor({old}=...) is now {old.replace('params', 'options')}=...", DeprecationWarning, stacklevel=2)
                given = options.pop(old)
                if old == "sparsifier_params":
                    sparsifier_options = given
                elif old == "index_params":
                    index_options = given
                else:
                    value_options = given
        try:
            self.ratio = float(ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"ratio must be a number in [0, 1], got {ratio!r}") from None
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in [0, 1], got {ratio!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self.sparsifier = get_sparsifier(sparsifier)
        index_cls = INDEX_CODECS.lookup(index)
        value_cls = VALUE_CODECS.lookup(value)
        routed: dict[str, dict[str, Any]] = {"s": dict(sparsifier_options or {}), "i": dict(index_options or {}), "v": dict(value_options or {})}
        declared = {
            "s": {p.name for p in self.sparsifier.options},
            "i": {p.name for p in index_cls.options},
            "v": {p.name for p in value_cls.options},
        }
        for key, value_ in options.items():
            targets = [part for part, names in declared.items() if key in names]
            if not targets:
                accepted = sorted(set().union(*declared.values()))
                raise ConfigError(
                    f"unknown option {key!r} for {sparsifier}/{index}/{value}; accepted: {', '.join(accepted) or 'none'}"
                )
            for part in targets:
                routed[part].setdefault(key, value_)
        self.sparsifier_config = resolve_options(f"sparsifier {sparsifier!r}", self.sparsifier.options, routed["s"])
        self.index_codec: IndexCodec = make_index_codec(index, routed["i"])
        self.index_codec.check_sparsifier(self.sparsifier.name, self.sparsifier_config, self.ratio)
        self.value_codec: ValueCodec = make_value_codec(value, routed["v"])
        self._steps: dict[int, int] = {}
        self._scratch = Scratch()  # selection's full-size temporaries, reused across calls

    # --- description -----------------------------------------------------------------

    @property
    def spec(self) -> str:
        """Canonical spec string; ``Compressor.from_spec(c.spec)`` rebuilds ``c`` (seed aside)."""
        return f"{self.sparsifier.spec(self.ratio, self.sparsifier_config)}/{self.index_codec.spec}/{self.value_codec.spec}"

    @property
    def fingerprint(self) -> str:
        """Hash of everything ranks must agree on (spec, seed, wire version)."""
        text = f"{self.spec}|seed={self.seed}|wire={wire.VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Compressor({self.spec!r}, seed={self.seed})"

    @classmethod
    def from_spec(cls, spec: str, *, seed: int = 0) -> "Compressor":
        """Build from ``"sparsifier[:ratio][,k=v]/index[:k=v,...]/value[:k=v,...]"``.

        Examples: ``"topk:0.01/eliasfano/fp16"``, ``"threshold:t=1e-3/rle/raw"``,
        ``"topk:0.001/bloom:fpr=1e-3,policy=p2/polyfit:degree=5"``. Missing parts
        default to ``eliasfano`` and ``fp16``."""
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"spec must be a non-empty string, got {spec!r}")
        segments = spec.split("/")
        if len(segments) > 3:
            raise ConfigError(f"spec {spec!r}: expected at most 3 '/'-separated parts (sparsifier/index/value)")
        segments += ["eliasfano", "fp16"][len(segments) - 1 :]
        sparsifier, positional, sparsifier_params = _parse_segment(segments[0], "sparsifier")
        ratio: Any = sparsifier_params.pop("ratio", None)
        if positional:
            if len(positional) > 1 or ratio is not None:
                raise ConfigError(f"spec {spec!r}: the sparsifier takes one ratio, got {positional}")
            ratio = positional[0]
        if ratio is None:
            ratio = 0.01
        codecs = []
        for segment, what in ((segments[1], "index codec"), (segments[2], "value codec")):
            name, extra, named = _parse_segment(segment, what)
            if extra:
                raise ConfigError(f"spec {spec!r}: {what} {name!r} takes key=value parameters, got {extra}")
            codecs.append((name, named))
        try:
            ratio = float(ratio)
        except ValueError:
            raise ConfigError(f"spec {spec!r}: ratio {ratio!r} is not a number") from None
        return cls(
            ratio, sparsifier, codecs[0][0], codecs[1][0], seed=seed,
            sparsifier_options=sparsifier_params, index_options=codecs[0][1], value_options=codecs[1][1],
        )

    def with_ratio(self, ratio: float) -> "Compressor":
        """The same compressor (codecs, options, seed) at another density."""
        index_cls = type(self.index_codec)
        value_cls = type(self.value_codec)
        return Compressor(
            ratio, self.sparsifier.name, index_cls.name, value_cls.name, seed=self.seed,
            sparsifier_options=self.sparsifier_config,
            index_options=_given_options(self.index_codec),
            value_options=_given_options(self.value_codec),
        )

    # --- compression -----------------------------------------------------------------

    def step_of(self, key: int | str = 0) -> int:
        """The step a call without ``step=`` would use for ``key`` next."""
        return self._steps.get(rng.stream_key(key), 0)

    def _next_step(self, key: int, step: int | None) -> int:
        if step is None:
            step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        return step

    def compress_detailed(self, tensor: torch.Tensor, *, step: int | None = None, key: int | str = 0,
                          timer: PhaseTimer | None = None, parts: Sequence[int] | None = None) -> Compressed:
        """Compress ``tensor`` (any shape, flattened) and report what receivers will decode.

        ``step`` and ``key`` (an int or a name, e.g. a parameter's) seed the random
        streams; without ``step`` a per-key counter is used. Ranks that exchange payloads
        must pass the same values. ``timer`` receives the time of each phase (profiling).
        ``parts``: element counts that tile the tensor (tensors laid end to end); each is
        sparsified at the ratio on its own, into one payload (see :meth:`packs_parts`)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"compress expects a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in wire.DTYPE_CODES:
            raise TypeError(f"compress supports {sorted(str(d) for d in wire.DTYPE_CODES)}, got {tensor.dtype}")
        flat = tensor.detach().reshape(-1)
        numel = flat.numel()
        if numel > wire.MAX_NUMEL:
            raise ValueError(f"tensor of {numel} elements exceeds the payload limit of {wire.MAX_NUMEL}")
        if parts is not None and not self.index_codec.lossless:
            raise ConfigError(f"compressor {self.spec}: tensors can share a payload only with a lossless index codec")
        stream = rng.stream_key(key)
        step = self._next_step(stream, step)
        rng_seed = rng.stream_seed(self.seed, step, stream)
        selected = select_with(self.sparsifier, self.sparsifier_config, flat, self.ratio,
                               SelectContext(rng_seed, step, getattr(self, "_scratch", None)), parts)
        mark(timer, "select")
        runs = _runs(selected.indices, parts) if self.value_codec.codes_runs else None
        ctx = CodecContext(numel, flat.dtype, flat.device, rng_seed, runs)
        index_part = self.index_codec.encode(selected.indices, ctx)
        indices = index_part.indices
        mark(timer, "index encode")
        # Values are read where the receivers will put them: for a lossy index codec
        # that is not where the sparsifier looked.
        values = selected.values if indices is selected.indices else flat.index_select(0, indices)
        if self.value_codec.lossless:
            value_part = self.value_codec.encode(values, ctx)
        else:  # what the receivers will decode, for the residual
            value_part, known = self.value_codec.encode_decoded(values, ctx)
            values = known if known is not None else self.value_codec.decode(value_part.data, value_part.params, indices.numel(), ctx)
        mark(timer, "value encode")
        payload = wire.pack(
            dtype=flat.dtype, numel=numel, k=indices.numel(),
            index_codec_id=self.index_codec.codec_id, value_codec_id=self.value_codec.codec_id,
            index=index_part, value=value_part,
            sparsifier_id=self.sparsifier.sparsifier_id, rng_seed=rng_seed,
        )
        mark(timer, "framing/CRC")
        return Compressed(payload, SparseGrad(indices, values, numel), selected.k)

    def select_indices(self, tensor: torch.Tensor, *, step: int, key: int | str = 0) -> IndexEncoding:
        """The sparsifier and the index codec only, with the random stream
        :meth:`compress_detailed` would use: the encoded index set of ``tensor`` (the
        shared-index scheme's leader broadcasts it; every rank sends its own values there)."""
        flat = tensor.detach().reshape(-1)
        rng_seed = rng.stream_seed(self.seed, step, rng.stream_key(key))
        selected = select_with(self.sparsifier, self.sparsifier_config, flat, self.ratio, SelectContext(rng_seed, step))
        return self.index_codec.encode(selected.indices, CodecContext(flat.numel(), flat.dtype, flat.device, rng_seed))

    def decode_indices(self, data: torch.Tensor, params: bytes, k: int, numel: int, dtype: torch.dtype, *, step: int,
                       key: int | str = 0) -> torch.Tensor:
        """The inverse of :meth:`select_indices`: ``k`` ascending indices in ``[0, numel)``,
        validated; :class:`DecodeError` on malformed input."""
        rng_seed = rng.stream_seed(self.seed, step, rng.stream_key(key))
        codec = type(self.index_codec)
        indices = codec.decode(data, params, k, CodecContext(numel, dtype, data.device, rng_seed))
        _check_indices(indices, k, numel, codec.name)
        return indices
    def packs_parts(self, part_numels: Sequence[int]) -> bool:
        """Whether tensors of these sizes, laid end to end, can travel in one payload with
        each one sparsified at the ratio on its own (``compress_detailed(parts=...)``) and
        receivers decoding bit for bit what per-tensor payloads would carry: a sparsifier
        that selects per part (``topk``; ``blocktopk`` when every tensor but the last is a
        whole number of its blocks), a lossless index codec, and a value codec that codes
        each tensor's values alike either way (:meth:`ValueCodec.packs`: ``raw``,
        ``bf16``; ``fp16`` with an exponent per tensor; ``uniform``, whose blocks restart
        at each tensor, when every tensor keeps at least a block of values). One header
        and one encode and decode then serve them all."""
        if len(part_numels) < 2 or not self.index_codec.lossless:
            return False
        if not self.sparsifier.selects_parts(part_numels, self.sparsifier_config):
            return False
        return self.value_codec.packs([self._kept_counts(numel) for numel in part_numels])

    def _kept_counts(self, numel: int) -> tuple[int, ...]:
        """The element counts the sparsifier can keep of ``numel`` at this ratio."""
        return self.sparsifier.kept_counts(numel, target_k(numel, self.ratio), self.sparsifier_config)

    def payload_size(self, numel: int, dtype: torch.dtype, parts: Sequence[int] | None = None) -> tuple[int, bool] | None:
        """``(bytes, exact)`` of the payload :meth:`compress` makes from any tensor of
        ``numel`` elements of ``dtype`` (with ``parts``: sparsified part by part):
        exactly that many bytes, or at most (``exact`` False); None when the size depends
        on the data (a sparsifier whose k varies, a codec that does not declare its size).
        Every rank computes the same answer, so a gather of such payloads needs no size
        exchange."""
        if not self.sparsifier.exact_k:
            return None
        if parts is not None:
            # Every combination of the parts' counts (whole blocks: a last part may keep one of two).
            options = [self._kept_counts(n) for n in parts]
            if math.prod(len(o) for o in options) > _MAX_COUNT_COMBINATIONS:
                return None
            runs_options = list(itertools.product(*options))
        else:
            runs_options = [(k,) for k in self._kept_counts(numel)]
        sizes = []
        for runs in runs_options:  # one count, or a few (whole blocks): the largest payload bounds them all
            k = sum(runs)
            index = self.index_codec.encoded_size(numel, k, dtype)
            value = self.value_codec.encoded_size_runs(numel, runs, dtype)
            if index is None or value is None:
                return None
            # pad8 is monotone, so a bound on the index part bounds its padded length too.
            nbytes = wire.HEADER_SIZE + wire.pad8(index.params + value.params) + wire.pad8(index.data) + value.data
            sizes.append((nbytes, index.exact and value.exact))
        largest = max(nbytes for nbytes, _ in sizes)
        return largest, len(sizes) == 1 and sizes[0][1]

    def compress(self, tensor: torch.Tensor, *, step: int | None = None, key: int | str = 0) -> torch.Tensor:
        """Compress ``tensor`` into a 1-D uint8 payload on the same device."""
        return self.compress_detailed(tensor, step=step, key=key).payload

    def encode(self, tensor: torch.Tensor, *, step: int | None = None, bucket: int = 0) -> Compressed:
        """Deprecated name of :meth:`compress_detailed` (``bucket`` is now ``key``)."""
        warnings.warn("Compressor.encode(..., bucket=) is now compress_detailed(..., key=)", DeprecationWarning, stacklevel=2)
        return self.compress_detailed(tensor, step=step, key=bucket)

    def decompress(self, payload: torch.Tensor) -> SparseGrad:
        """Decode a payload (from any compressor configuration: the header says all)."""
        return decode(payload)


_MAX_COUNT_COMBINATIONS = 64  # beyond that a packed payload's size is exchanged, not computed


def _runs(indices: torch.Tensor, parts: Sequence[int] | None) -> tuple[int, ...] | None:
    """How many of the ascending ``indices`` fall in each of ``parts`` (None without parts)."""
    if parts is None:
        return None
    ends = torch.tensor(list(itertools.accumulate(parts)), device=indices.device)
    cut = torch.searchsorted(indices, ends)
    return tuple(int(n) for n in torch.diff(cut, prepend=cut.new_zeros(1)).tolist())


def _given_options(codec: Any) -> dict[str, Any]:
    return {o.name: codec.config[o.name] for o in codec.options if codec.config[o.name] is not None}


def _check_indices(indices: torch.Tensor, k: int, numel: int, codec: str) -> None:
    if indices.dtype != torch.int64 or indices.dim() != 1 or indices.numel() != k:
        raise DecodeError(f"index part ({codec}): decoded {indices.numel()} indices, header says k={k}")
    if k == 0:
        return
    if bool(indices[0] < 0) or bool(indices[-1] >= numel):
        raise DecodeError(f"index part ({codec}): index out of range [0, {numel})")
    if not _bits.strictly_ascending(indices):
        raise DecodeError(f"index part ({codec}): indices are not strictly ascending")


def decode(payload: Any) -> SparseGrad:
    """Decode any deepreduce payload into a :class:`SparseGrad` (no compressor needed).

    Every malformed payload raises :class:`~deepreduce.DecodeError` naming the field."""
    payload = wire.as_payload(payload)
    header = wire.read_header(payload)
    ctx = CodecContext(header.numel, header.dtype, payload.device, header.rng_seed)
    index_data = payload[header.index_offset : header.index_offset + header.index_nbytes]
    value_data = payload[header.value_offset : header.total_nbytes]
    # Values first: their length bounds k before any index decoder allocates for it.
    value_cls = VALUE_CODECS.from_id(header.value_codec_id)
    values = value_cls.decode(value_data, header.value_params, header.k, ctx)
    if values.numel() != header.k or values.dtype != header.dtype:
        raise DecodeError(f"value part ({value_cls.name}): decoded {values.numel()} values, header says k={header.k}")
    index_cls = INDEX_CODECS.from_id(header.index_codec_id)
    indices = index_cls.decode(index_data, header.index_params, header.k, ctx)
    _check_indices(indices, header.k, header.numel, index_cls.name)
    return SparseGrad(indices, values, header.numel)

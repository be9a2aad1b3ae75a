"""Codec registry and the two codec interfaces.

An *index codec* turns the ascending index set of a :class:`~deepreduce.sparse.SparseGrad`
into bytes and back. It may be lossy (Bloom filters): then ``encode`` returns the index
set the receivers will decode, and the compressor reads the values at exactly those
positions from the dense gradient. A *value codec* turns the aligned values into bytes.

Each codec lives in its own module under ``codecs/index`` or ``codecs/value`` and
registers itself with :func:`register_index_codec` / :func:`register_value_codec`;
modules there are imported automatically, so adding a file (and its wire id in
:mod:`deepreduce.codecs.ids`) adds a codec.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .. import rng
from ..errors import ConfigError, DecodeError
from ..options import Option, format_options, resolve_options
from .ids import wire_id


@dataclass(frozen=True)
class CodecContext:
    """What both sides of a payload know about it: shape, dtype, device, random stream."""

    numel: int
    dtype: torch.dtype
    device: torch.device
    rng_seed: int = 0
    # Values per tensor when several share the payload (in order, summing to k); a value
    # codec that codes values in blocks may restart its blocks at each run. Encoding only.
    runs: tuple[int, ...] | None = None

    def generator(self, salt: int) -> torch.Generator:
        return rng.generator(self.rng_seed, salt, self.device)


@dataclass(frozen=True)
class IndexEncoding:
    data: torch.Tensor  # uint8 bytes of the index part
    params: bytes  # small host-side parameters the decoder needs (written in the header)
    indices: torch.Tensor  # the ascending index set the receivers will decode


@dataclass(frozen=True)
class ValueEncoding:
    data: torch.Tensor
    params: bytes


@dataclass(frozen=True)
class PartSize:
    """The size of one encoded part, known before encoding: ``data`` bytes (exactly, or
    at most when ``exact`` is False) and ``params`` header bytes (always exact)."""

    data: int
    params: int
    exact: bool = True


class _Codec:
    name: ClassVar[str]
    codec_id: ClassVar[int]
    description: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    options: ClassVar[Sequence[Option]] = ()
    kind: ClassVar[str] = "codec"

    def __init__(self, **options: Any) -> None:
        self.config = resolve_options(f"{self.kind} codec {self.name!r}", self.options, options)

    @property
    def spec(self) -> str:
        args = format_options(self.config, self.options)
        return f"{self.name}:{args}" if args else self.name

    def __repr__(self) -> str:
        return f"<{self.kind} codec {self.spec}>"


class IndexCodec(_Codec):
    """Base class of index codecs."""

    kind: ClassVar[str] = "index"
    general: ClassVar[bool] = True  # carries any ascending index set (False: only what its sparsifier makes)
    sparsifier: ClassVar[str] = "topk"  # the sparsifier that benchmarks and fuzzers pair it with (its own, if not general)

    def encode(self, indices: torch.Tensor, ctx: CodecContext) -> IndexEncoding:
        """Encode ascending unique int64 ``indices`` in ``[0, ctx.numel)``."""
        raise NotImplementedError

    def check_sparsifier(self, name: str, options: Mapping[str, Any], ratio: float) -> None:
        """Raise :class:`ConfigError` if the sparsifier ``name`` with ``options`` at density
        ``ratio`` makes index sets this codec cannot carry (checked when a compressor is
        built). A codec that is not ``general`` carries what its own sparsifier selects,
        and every element (or none) from any sparsifier."""
        if not self.general and name != self.sparsifier and 0.0 < ratio < 1.0:
            raise ConfigError(
                f"the {self.name} index codec carries only the index sets of the {self.sparsifier} sparsifier "
                f"(or every element, ratio 1), not {name} at ratio {ratio:g}: use {self.sparsifier} with it, or an "
                f"index codec for any set (eliasfano, raw, rle, zstd)")

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        """Return the ``k`` ascending int64 indices; raise :class:`DecodeError` on bad input."""
        raise NotImplementedError

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize | None:
        """The size of the part :meth:`encode` makes for ``k`` of ``numel`` indices, whatever
        they are; None when it depends on the data, or when the codec may change ``k``.

        Declaring it lets the engine skip the blocking exchange of message sizes: every
        rank can then compute every rank's message size (an upper bound suffices: the
        gather pads to it)."""
        return None


class ValueCodec(_Codec):
    """Base class of value codecs."""

    kind: ClassVar[str] = "value"
    codes_runs: ClassVar[bool] = False  # reads CodecContext.runs (the compressor counts them only then)

    def encode(self, values: torch.Tensor, ctx: CodecContext) -> ValueEncoding:
        """Encode the values (dtype ``ctx.dtype``) aligned with ascending indices."""
        raise NotImplementedError

    @classmethod
    def decode(cls, data: torch.Tensor, params: bytes, k: int, ctx: CodecContext) -> torch.Tensor:
        """Return ``k`` values of dtype ``ctx.dtype``; raise :class:`DecodeError` on bad input."""
        raise NotImplementedError

    def encode_decoded(self, values: torch.Tensor, ctx: CodecContext) -> tuple[ValueEncoding, torch.Tensor | None]:
        """:meth:`encode`, and the values receivers will :meth:`decode` from it (bit for bit:
        error feedback keeps the difference), or None where the codec does not know them
        while encoding (the compressor then decodes its own part). Override it to skip
        that decode."""
        return self.encode(values, ctx), None

    def encoded_size(self, numel: int, k: int, dtype: torch.dtype) -> PartSize | None:
        """The size of the part :meth:`encode` makes for ``k`` values of ``dtype``, whatever
        they are; None when it depends on the data (see :meth:`IndexCodec.encoded_size`)."""
        return None

    def encoded_size_runs(self, numel: int, runs: Sequence[int], dtype: torch.dtype) -> PartSize | None:
        """:meth:`encoded_size` for values coded with ``CodecContext.runs`` set to ``runs``."""
        return self.encoded_size(numel, sum(runs), dtype)

    def packs(self, run_counts: Sequence[Sequence[int]]) -> bool:
        """Whether runs of values laid end to end (run ``i`` of any length in
        ``run_counts[i]``) decode, coded as one part, to exactly what coding each run on
        its own decodes to -- so several tensors can share one payload without changing
        what receivers get. True for lossless codecs; a lossy codec says so where its
        error does not depend on the neighbouring values."""
        return self.lossless


class _Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.by_name: dict[str, type[_Codec]] = {}
        self.by_id: dict[int, type[_Codec]] = {}

    def add(self, cls: type[_Codec]) -> type[_Codec]:
        cls.codec_id = wire_id(self.kind, cls.name)
        if cls.name in self.by_name or cls.codec_id in self.by_id:
            raise RuntimeError(f"{self.kind} codec {cls.name!r} (id {cls.codec_id}) registered twice")
        self.by_name[cls.name] = cls
        self.by_id[cls.codec_id] = cls
        return cls

    def lookup(self, name: str) -> type[_Codec]:
        _discover()
        try:
            return self.by_name[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} codec {name!r}; registered: {', '.join(sorted(self.by_name))}"
            ) from None

    def from_id(self, codec_id: int) -> type[_Codec]:
        _discover()
        try:
            return self.by_id[codec_id]
        except KeyError:
            raise DecodeError(f"header field {self.kind}_codec: unknown codec id {codec_id}") from None

    def names(self) -> list[str]:
        _discover()
        return sorted(self.by_name)


INDEX_CODECS = _Registry("index")
VALUE_CODECS = _Registry("value")


def register_index_codec(cls: type[IndexCodec]) -> type[IndexCodec]:
    INDEX_CODECS.add(cls)
    return cls


def register_value_codec(cls: type[ValueCodec]) -> type[ValueCodec]:
    VALUE_CODECS.add(cls)
    return cls


def import_plugins(package: str) -> None:
    """Import every public module of ``package`` (each registers itself when imported)."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


_discovered = False


def _discover() -> None:
    """Import every codec in codecs/index and codecs/value, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for package in ("index", "value"):
        import_plugins(f"{__name__}.{package}")


def index_codecs() -> list[str]:
    """Names of the registered index codecs."""
    return INDEX_CODECS.names()


def value_codecs() -> list[str]:
    """Names of the registered value codecs."""
    return VALUE_CODECS.names()


def make_index_codec(name: str, options: Mapping[str, Any] | None = None) -> IndexCodec:
    return INDEX_CODECS.lookup(name)(**dict(options or {}))  # type: ignore[return-value]


def make_value_codec(name: str, options: Mapping[str, Any] | None = None) -> ValueCodec:
    return VALUE_CODECS.lookup(name)(**dict(options or {}))  # type: ignore[return-value]


__all__ = [
    "CodecContext",
    "IndexCodec",
    "IndexEncoding",
    "PartSize",
    "ValueCodec",
    "ValueEncoding",
    "INDEX_CODECS",
    "VALUE_CODECS",
    "register_index_codec",
    "register_value_codec",
    "index_codecs",
    "value_codecs",
    "make_index_codec",
    "make_value_codec",
]

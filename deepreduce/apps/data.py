"""Real text to train on, as bytes: by default the Python standard library's own source.

Every machine with Python has tens of MB of it, so a byte-level language model on it
is a real task that trains the same way everywhere (:func:`stdlib_corpus`).
:func:`text_corpus` reads your own text instead: one file, or a folder of files read
recursively. Files are read in sorted order; whole files are held out for validation
(every ``val_every``-th file), so validation text is never seen in training. A single
file holds out its tail.

:func:`stdlib_classes` is a second task on the same source: which top-level package
(``email``, ``asyncio``, ``unittest``...) does a snippet come from? Whole files are held
out for validation there too.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the standard library (not site-packages), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    if not files:
        raise RuntimeError(f"no standard library sources found under {root}")
    return files


@dataclass(frozen=True)
class ByteCorpus:
    """Training and validation bytes as uint8 tensors, and a fingerprint of both."""

    train: torch.Tensor
    val: torch.Tensor
    digest: str

    @property
    def train_bytes(self) -> int:
        return self.train.numel()

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs and next-byte targets, int64 ``(B, seq_len)``."""
        data = self.train if split == "train" else self.val
        if data.numel() <= seq_len + 1:
            raise ValueError(f"{split} split has {data.numel()} bytes, need more than seq_len+1={seq_len + 1}")
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        offsets = starts[:, None] + torch.arange(seq_len + 1)
        window = data[offsets].long()
        return window[:, :-1], window[:, 1:]


class CorpusError(ValueError):
    """The text for a corpus is missing, unreadable, or too short to split."""


def text_files(root: Path) -> list[Path]:
    """Regular files under ``root``, recursively, sorted by path; hidden files and
    folders (names starting with ``.``) and ``__pycache__`` are left out."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files.extend(Path(dirpath) / name for name in sorted(filenames)
                     if not name.startswith(".") and (Path(dirpath) / name).is_file())
    return sorted(files)


def _split_files(paths: list[Path], max_bytes: int, val_every: int, *, user: bool) -> tuple[list[bytes], list[bytes]]:
    """Training and validation bytes of ``paths``, read in order until ``max_bytes`` is
    reached (the file that reaches it is kept whole, but no file gives more than
    ``max_bytes``). Every ``val_every``-th file goes to validation.

    ``user``: files a user pointed at: an unreadable file is an error and files with a
    NUL byte (binary) are skipped. Otherwise (the stdlib) unreadable files are skipped."""
    train, val, total, position = [], [], 0, 0
    for path in paths:
        if not user:
            position += 1  # the stdlib's split counts every file, so it does not move if one is unreadable
        try:
            with open(path, "rb") as f:
                text = f.read(max_bytes)
        except OSError as error:
            if user:
                raise CorpusError(f"cannot read {path}: {error.strerror or error}") from error
            continue
        if user and (not text or b"\0" in text):
            continue
        if user:
            position += 1  # a user folder's split counts the text files only
        (val if position % val_every == 0 else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return train, val


def _hold_out_tail(text: bytes, val_every: int) -> tuple[bytes, bytes]:
    cut = len(text) - len(text) // val_every
    return text[:cut], text[cut:]


def _corpus(train_bytes: bytes, val_bytes: bytes) -> ByteCorpus:
    digest = hashlib.sha256(train_bytes + b"\0" + val_bytes).hexdigest()[:16]

    def to_tensor(raw: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    return ByteCorpus(to_tensor(train_bytes), to_tensor(val_bytes), digest)


@lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = 16 << 20, val_every: int = 10, *, min_split_bytes: int = 2) -> ByteCorpus:
    """Up to ``max_bytes`` of stdlib source; every ``val_every``-th file goes to validation.
    Raises :class:`CorpusError` when either split would be shorter than ``min_split_bytes``."""
    train, val = _split_files(stdlib_files(), max_bytes, val_every, user=False)
    return _checked_corpus("the standard library's source", b"".join(train), b"".join(val), min_split_bytes)


def text_corpus(path: str | os.PathLike, max_bytes: int = 16 << 20, *, val_every: int = 10,
                min_split_bytes: int = 2) -> ByteCorpus:
    """A corpus from your own text: a file (any bytes, e.g. UTF-8 text) or a folder of them.

    A folder is read recursively, sorted by path (see :func:`text_files`; empty
    files and files with a NUL byte, taken for binary, are skipped) until ``max_bytes``;
    every ``val_every``-th text file is held out for validation; with fewer files the
    last one is, and with one file its tail. A single file gives its first ``max_bytes``
    bytes, of which the last ``1/val_every`` is held out. Raises :class:`CorpusError` for a missing path, a folder
    without text files, or when either split would be shorter than ``min_split_bytes``
    (training needs more than ``seq_len + 1`` bytes in each).
    """
    if max_bytes < 1:
        raise CorpusError(f"max_bytes must be >= 1, not {max_bytes}")
    if val_every < 2:
        raise CorpusError(f"val_every must be >= 2, not {val_every}")
    root = Path(path)
    if not root.exists():
        raise CorpusError(f"{root}: no such file or folder")
    if root.is_dir():
        files = text_files(root)
        if not files:
            raise CorpusError(f"{root}: folder has no files (hidden files and __pycache__ are skipped)")
        train_files, val_files = _split_files(files, max_bytes, val_every, user=True)
        if not train_files and not val_files:
            raise CorpusError(f"{root}: no text in its {len(files)} file(s) (empty files and files with NUL bytes are skipped)")
        read = len(train_files) + len(val_files)
        if not val_files:  # fewer files than val_every: hold out the last one, or one file's tail
            if len(train_files) > 1:
                val_files.append(train_files.pop())
            else:
                train_files[0], tail = _hold_out_tail(train_files[0], val_every)
                val_files.append(tail)
        train, val = b"".join(train_files), b"".join(val_files)
        what = f"{root} ({read} text file{'s' if read > 1 else ''} read)"
    else:
        try:
            with open(root, "rb") as f:
                text = f.read(max_bytes)
        except OSError as error:
            raise CorpusError(f"cannot read {root}: {error.strerror or error}") from error
        train, val = _hold_out_tail(text, val_every)
        what = str(root)
    return _checked_corpus(what, train, val, min_split_bytes)


def _checked_corpus(what: str, train: bytes, val: bytes, min_split_bytes: int) -> ByteCorpus:
    if min(len(train), len(val)) < min_split_bytes:
        raise CorpusError(
            f"{what}: too little text: {len(train)} bytes for training and {len(val)} for validation, "
            f"need at least {min_split_bytes} in each")
    return _corpus(train, val)


# --- snippet classification ---------------------------------------------------------------

MIN_CLASS_FILES = 3
MIN_FILE_BYTES = 256  # shorter files (mostly near-empty __init__.py) say little about their package


@dataclass(frozen=True)
class LabelledFiles:
    """One split of :class:`SnippetClasses`: files laid end to end in ``data``, grouped by class."""

    data: torch.Tensor  # uint8, every file's bytes
    starts: torch.Tensor  # int64 (F,), where each file begins in data
    lengths: torch.Tensor  # int64 (F,)
    labels: torch.Tensor  # int64 (F,), class of each file, non-decreasing
    class_files: torch.Tensor  # int64 (K+1,), files of class k are class_files[k]:class_files[k+1]
    paths: tuple[str, ...]  # each file's path relative to the stdlib root


@dataclass(frozen=True)
class SnippetClasses:
    """Which top-level standard-library package does a snippet of source come from?

    ``classes`` are the package names; ``train`` and ``val`` hold whole, disjoint files.
    :meth:`batch` draws class-balanced windows, like :meth:`ByteCorpus.batch`, but the
    target is one class index per window."""

    classes: tuple[str, ...]
    train: LabelledFiles
    val: LabelledFiles
    digest: str

    @property
    def train_bytes(self) -> int:
        return self.train.data.numel()

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows ``(B, seq_len)`` int64 and their classes ``(B,)``.

        Each window draws a class uniformly, then a window start uniformly among all of
        that class's windows (so longer files give more windows). Files shorter than
        ``seq_len`` are padded with byte 0, which source files do not contain."""
        files = self.train if split == "train" else self.val
        window_starts = (files.lengths - seq_len + 1).clamp(min=1)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.int64), window_starts.cumsum(0)])
        labels = torch.randint(0, len(self.classes), (batch_size,), generator=generator)
        first = cumulative[files.class_files[labels]]
        count = cumulative[files.class_files[labels + 1]] - first
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        index = first + (u * count).long().clamp(max=count - 1)  # a window among all of the class's
        file = torch.searchsorted(cumulative, index, right=True) - 1
        offset = (index - cumulative[file])[:, None] + torch.arange(seq_len)
        inside = offset < files.lengths[file][:, None]
        position = (files.starts[file][:, None] + offset).clamp(max=files.data.numel() - 1)
        x = torch.where(inside, files.data[position], torch.zeros((), dtype=torch.uint8)).long()
        return x, labels


def stdlib_packages(min_files: int = MIN_CLASS_FILES, min_file_bytes: int = MIN_FILE_BYTES) -> dict[str, list[Path]]:
    """The stdlib's top-level packages with at least ``min_files`` source files of at least
    ``min_file_bytes`` bytes, each with those files (sorted), largest package (in bytes) first.
    Single-file modules (``os.py``) are no package and left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages: dict[str, list[Path]] = {}
    sizes: dict[str, int] = {}
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if len(parts) < 2 or size < min_file_bytes:
            continue
        packages.setdefault(parts[0], []).append(path)
        sizes[parts[0]] = sizes.get(parts[0], 0) + size
    eligible = [name for name, paths in packages.items() if len(paths) >= min_files]
    return {name: packages[name] for name in sorted(eligible, key=lambda n: (-sizes[n], n))}


def _labelled_files(texts: list[tuple[str, int, bytes]], num_classes: int) -> LabelledFiles:
    """``texts``: (path, label, bytes) sorted by label."""
    lengths = torch.tensor([len(t) for _, _, t in texts], dtype=torch.int64)
    labels = torch.tensor([label for _, label, _ in texts], dtype=torch.int64)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    class_files = torch.searchsorted(labels, torch.arange(num_classes + 1))
    data = torch.frombuffer(bytearray(b"".join(t for _, _, t in texts)), dtype=torch.uint8)
    return LabelledFiles(data, starts, lengths, labels, class_files, tuple(p for p, _, _ in texts))


@lru_cache(maxsize=4)
def stdlib_classes(num_classes: int = 16, max_bytes: int = 16 << 20, val_every: int = 10) -> SnippetClasses:
    """The ``num_classes`` largest packages of :func:`stdlib_packages` as classes.

    Each class reads at most ``max_bytes / num_classes`` bytes of its files, in an order
    fixed by a hash of their paths (so a capped class samples all of its package, not its
    alphabetical start); in that order the 1st, 11th, 21st... file is held out whole for
    validation, so every class has a validation file. Unreadable files are skipped.
    Raises :class:`CorpusError` if there are fewer packages than ``num_classes``."""
    if num_classes < 2:
        raise CorpusError(f"need at least 2 classes, not {num_classes}")
    if val_every < 2:
        raise CorpusError(f"val_every must be >= 2, not {val_every}")
    packages = stdlib_packages()
    if len(packages) < num_classes:
        raise CorpusError(f"the standard library has {len(packages)} packages with at least {MIN_CLASS_FILES} source "
                          f"files of {MIN_FILE_BYTES} bytes or more, fewer than the {num_classes} classes asked for")
    root = Path(sysconfig.get_paths()["stdlib"])
    classes = tuple(list(packages)[:num_classes])
    cap = max(1, max_bytes // num_classes)
    splits: dict[str, list[tuple[str, int, bytes]]] = {"train": [], "val": []}
    digest = hashlib.sha256()
    for label, name in enumerate(classes):
        relative = sorted((p.relative_to(root).as_posix() for p in packages[name]),
                          key=lambda r: hashlib.sha256(r.encode()).digest())
        taken = {"train": 0, "val": 0}
        for position, rel in enumerate(relative):
            try:
                with open(root / rel, "rb") as f:
                    text = f.read(cap)
            except OSError:
                continue
            split = "val" if position % val_every == 0 else "train"
            splits[split].append((rel, label, text))
            taken[split] += len(text)
            if sum(taken.values()) >= cap and taken["train"] and taken["val"]:
                break
        if not (taken["train"] and taken["val"]):
            raise CorpusError(f"class {name!r}: could not read files for both training and validation")
    for split, texts in splits.items():
        for rel, label, text in texts:
            digest.update(f"{split}\0{classes[label]}\0{len(text)}\0".encode())
            digest.update(text)
    return SnippetClasses(classes, _labelled_files(splits["train"], num_classes),
                          _labelled_files(splits["val"], num_classes), digest.hexdigest()[:16])

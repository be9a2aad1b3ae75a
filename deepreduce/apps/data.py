"""Real text to train on, as bytes: by default the Python standard library's own source.

Every machine with Python has tens of MB of it, so a byte-level language model on it
is a real task that trains the same way everywhere (:func:`stdlib_corpus`).
:func:`text_corpus` reads your own text instead: one file, or a folder of files read
recursively. Files are read in sorted order; whole files are held out for validation
(every ``val_every``-th file), so validation text is never seen in training. A single
file holds out its tail.
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
def stdlib_corpus(max_bytes: int = 16 << 20, val_every: int = 10) -> ByteCorpus:
    """Up to ``max_bytes`` of stdlib source; every ``val_every``-th file goes to validation."""
    train, val = _split_files(stdlib_files(), max_bytes, val_every, user=False)
    return _corpus(b"".join(train), b"".join(val))


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
        if not val_files:  # fewer files than val_every: hold out the last one, or one file's tail
            if len(train_files) > 1:
                val_files.append(train_files.pop())
            else:
                train_files[0], tail = _hold_out_tail(train_files[0], val_every)
                val_files.append(tail)
        train, val = b"".join(train_files), b"".join(val_files)
        what = f"{root} ({len(train_files) + len(val_files)} text files read)"
    else:
        try:
            with open(root, "rb") as f:
                text = f.read(max_bytes)
        except OSError as error:
            raise CorpusError(f"cannot read {root}: {error.strerror or error}") from error
        train, val = _hold_out_tail(text, val_every)
        what = str(root)
    short = min(len(train), len(val))
    if short < min_split_bytes:
        raise CorpusError(
            f"{what}: too little text: {len(train)} bytes for training and {len(val)} for validation, "
            f"need at least {min_split_bytes} in each")
    return _corpus(train, val)

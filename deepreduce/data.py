"""Real data that needs no download: the Python standard library's own source text.

Every machine with Python has tens of MB of it, so a byte-level language model on it
is a real task that trains the same way everywhere. Files are read in sorted order;
whole files are held out for validation (every ``val_every``-th file), so validation
text is never seen in training.
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


@lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = 16 << 20, val_every: int = 10) -> ByteCorpus:
    """Up to ``max_bytes`` of stdlib source; every ``val_every``-th file goes to validation."""
    train, val, total = [], [], 0
    for i, path in enumerate(stdlib_files()):
        try:
            text = path.read_bytes()
        except OSError:
            continue
        (val if i % val_every == val_every - 1 else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    train_bytes, val_bytes = b"".join(train), b"".join(val)
    digest = hashlib.sha256(train_bytes + b"\0" + val_bytes).hexdigest()[:16]

    def to_tensor(raw: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    return ByteCorpus(to_tensor(train_bytes), to_tensor(val_bytes), digest)

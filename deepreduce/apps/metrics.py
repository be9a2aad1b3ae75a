"""Reading ``deepreduce train --metrics`` files, and a fingerprint of a model's parameters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def read_metrics(path: Path) -> tuple[list[dict], dict | None]:
    """Step records and the summary of a ``deepreduce train --metrics`` file."""
    steps, summary = [], None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line still being written
                continue
            if "summary" in record:
                summary = record["summary"]
            else:
                steps.append(record)
    return steps, summary


def params_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the parameters' bytes: equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]

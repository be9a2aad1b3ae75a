from __future__ import annotations

import pytest
import torch

from deepreduce.apps.data import stdlib_corpus
from deepreduce.apps.models import ByteTransformer, resnet


def model_gradient(model: torch.nn.Module, seq_len: int, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """The flat gradient of one backward pass on real stdlib text."""
    torch.manual_seed(seed)
    corpus = stdlib_corpus(max_bytes=4 << 20)
    x, y = corpus.batch("train", batch, seq_len, torch.Generator().manual_seed(seed))
    model.zero_grad()
    model.loss(x, y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="session")
def real_gradients() -> dict[str, torch.Tensor]:
    """Gradients of a small transformer LM and a ResNet-18 on stdlib source text."""
    torch.manual_seed(0)
    return {
        "transformer": model_gradient(ByteTransformer(d_model=128, n_layers=2, n_heads=4, seq_len=128), 128),
        "resnet18": model_gradient(resnet("resnet18"), 1024),
    }

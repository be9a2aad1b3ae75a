"""A tiny regression model and its data, shared by the optimizer tests and workers."""

from __future__ import annotations

import torch


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.ReLU(), torch.nn.Linear(50, 3))


def backward(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 40, generator=gen), torch.randn(16, 3, generator=gen)
    torch.nn.functional.mse_loss(model(x), y).backward()

"""Small real models for demos, tests and benchmarks (no torchvision needed).

- :class:`ByteTransformer`: a GPT-style byte-level language model.
- :class:`ByteConvClassifier`: a 1-D convolutional network that classifies a window of
  bytes (which package a snippet of source comes from).
- :func:`resnet`: a ResNet (basic or bottleneck blocks) that reads a 1024-byte window
  of source text laid out as a 32x32 grid (source code is 2-D: lines and columns)
  and predicts the byte that follows it. ``resnet("resnet50")`` has ResNet-50's
  layer layout and 161 parameter tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """Decoder-only transformer over bytes (vocabulary 256)."""

    def __init__(self, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, seq_len: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.seq_len = seq_len
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's seq_len={self.seq_len}")
        x = self.embed(tokens) + self.pos[:t]
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.ln(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.logits_loss(self(tokens), targets)

    @staticmethod
    def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy of ``forward``'s logits against ``targets`` ``(B, T)``."""
        return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))


class ByteConvClassifier(nn.Module):
    """Byte embedding, ``n_layers`` Conv1d + ReLU (residual after the first; the length is
    max-pooled by 2 before each), global max and mean pooling, a linear layer to
    ``num_classes``. No normalisation layers: without them the residual stack learns
    faster here, and there are no buffers or per-rank batch statistics under DDP."""

    def __init__(self, num_classes: int, width: int = 128, n_layers: int = 4, kernel: int = 5, embed_dim: int = 32) -> None:
        super().__init__()
        if num_classes < 2 or width < 1 or n_layers < 1 or kernel < 1:
            raise ValueError(f"need num_classes >= 2 and positive width, n_layers and kernel, got "
                             f"{num_classes}, {width}, {n_layers}, {kernel}")
        self.embed = nn.Embedding(256, embed_dim)
        self.convs = nn.ModuleList(
            nn.Conv1d(embed_dim if i == 0 else width, width, kernel, padding=kernel // 2) for i in range(n_layers))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: ``(B, T)`` bytes; returns ``(B, num_classes)`` logits."""
        x = F.relu(self.convs[0](self.embed(tokens).transpose(1, 2)))
        for conv in self.convs[1:]:
            if x.shape[-1] >= 2:
                x = F.max_pool1d(x, 2)
            x = x + F.relu(conv(x))
        return self.head(torch.cat([x.amax(dim=-1), x.mean(dim=-1)], dim=1))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.logits_loss(self(tokens), labels)

    @staticmethod
    def logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``forward``'s logits against ``labels`` ``(B,)``."""
        return F.cross_entropy(logits, labels)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.short = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.short(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet over a 32x32 grid of byte embeddings; predicts the next byte (256 classes)."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], num_classes: int = 256, embed_dim: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, embed_dim)
        self.conv1 = nn.Conv2d(embed_dim, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, depth in enumerate(layers):
            width = 64 * 2**i
            for j in range(depth):
                stages.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.embed(grid).permute(0, 3, 1, 2)  # (B, 32, 32) bytes -> (B, C, 32, 32)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``tokens``: (B, 1024) byte windows; predicts the byte after each window."""
        side = int(math.isqrt(tokens.shape[1]))
        grid = tokens[:, -side * side :].reshape(-1, side, side)
        return F.cross_entropy(self(grid), targets[:, -1])


_RESNETS = {
    "resnet18": (_Basic, (2, 2, 2, 2)),
    "resnet50": (_Bottleneck, (3, 4, 6, 3)),
}


def resnet(name: str = "resnet18", num_classes: int = 256) -> ResNet:
    """``resnet18`` (11 M parameters) or ``resnet50`` (24 M with 256 classes, 25.6 M with 1000)."""
    try:
        block, layers = _RESNETS[name]
    except KeyError:
        raise ValueError(f"unknown resnet {name!r}; known: {', '.join(_RESNETS)}") from None
    return ResNet(block, layers, num_classes)

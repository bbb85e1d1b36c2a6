"""The small attention MIL network of Ilse et al. (2018) for the classical MIL benchmarks.

Written from the paper (Appendix, Table for MUSK / Elephant): instance layers fc 256 - fc 128 -
fc 64 with ReLU, then attention pooling (plain or gated, hidden size 64), then a linear bag
classifier (two logits instead of the paper's one sigmoid output: the same model, softmax over
2 classes). Registered as ``abmil_small`` and ``gated_abmil_small``. Unlike ``abmil`` (one
embedding layer sized for 1024-d+ foundation-model features) this deeper, narrower net suits the
low-dimensional hand-crafted features of Musk (166-d) and Elephant (230-d).
"""

from __future__ import annotations

import torch
from torch import nn

from histomil.models.base import MILOutput
from histomil.models.layers import AttentionPool
from histomil.models.pooling import check_dropout


class SmallABMIL(nn.Module):
    """``forward(x (B, N, D), mask (B, N) | None) -> MILOutput``; instance MLP ``hidden`` then attention."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        hidden: tuple[int, ...] = (256, 128, 64),
        attn_dim: int = 64,
        gated: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if in_dim < 1 or n_classes < 1 or attn_dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError("in_dim, hidden sizes and attn_dim must be >= 1 and n_classes (outputs: classes, or 1 for a value or risk) >= 1")
        check_dropout(dropout)
        self.in_dim = in_dim
        self.n_classes = n_classes
        layers: list[nn.Module] = []
        dim = in_dim
        for width in hidden:
            layers += [nn.Linear(dim, width), nn.ReLU(), nn.Dropout(dropout)]
            dim = width
        self.embed = nn.Sequential(*layers)
        self.pool = AttentionPool(dim, attn_dim=attn_dim, gated=gated)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if x.dim() != 3:
            raise ValueError(f"expected x of shape (B, N, D), got {tuple(x.shape)}")
        z, attention = self.pool(self.embed(x), mask)
        return MILOutput(logits=self.classifier(z), attention=attention, extras={"bag_embedding": z})

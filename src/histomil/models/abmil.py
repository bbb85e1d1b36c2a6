"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018) on cached tile features.

Instance features -> optional embedding MLP -> attention pooling (plain or gated) -> linear
classifier on the bag embedding. The attention weights double as a tile-level explanation.
"""

from __future__ import annotations

import torch
from torch import nn

from histomil.models.base import MILOutput
from histomil.models.layers import AttentionPool, EmbeddingMLP
from histomil.models.pooling import check_dropout


class ABMIL(nn.Module):
    """Attention MIL: ``forward(x (B, N, D), mask (B, N) | None) -> MILOutput``.

    ``embed_dim=None`` pools the encoder features directly (no trainable embedding).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        embed_dim: int | None = 512,
        attn_dim: int = 128,
        gated: bool = False,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 1 or attn_dim < 1 or (embed_dim is not None and embed_dim < 1):
            raise ValueError("in_dim, embed_dim and attn_dim must be >= 1 and n_classes (outputs: classes, or 1 for a value or risk) >= 1")
        check_dropout(dropout)
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.embed = EmbeddingMLP(in_dim, embed_dim, dropout) if embed_dim is not None else nn.Identity()
        dim = embed_dim if embed_dim is not None else in_dim
        self.pool = AttentionPool(dim, attn_dim=attn_dim, gated=gated, dropout=dropout)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if x.dim() != 3:
            raise ValueError(f"expected x of shape (B, N, D), got {tuple(x.shape)}")
        h = self.embed(x)
        z, attention = self.pool(h, mask)
        return MILOutput(logits=self.classifier(z), attention=attention, extras={"bag_embedding": z})

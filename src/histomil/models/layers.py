"""Reusable building blocks for MIL models: masked softmax, attention pooling, embedding MLP.

Every model in histomil is a composition of these layers, so padding and masking are handled in
one place. Conventions: bags come as ``h`` (B, N, D) with a bool ``mask`` (B, N), True = real tile.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` that gives padding exactly 0 weight.

    A bag with no real tiles has no defined distribution; rather than return NaN (which would
    silently poison a training run) this raises ``ValueError``.
    """
    if mask is None:
        return torch.softmax(scores, dim=dim)
    mask = mask.to(dtype=torch.bool, device=scores.device)
    if mask.shape != scores.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match scores shape {tuple(scores.shape)}")
    if not bool(mask.any(dim=dim).all()):
        raise ValueError("bag has no tiles (fully masked)")
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)
    # softmax of -inf is already 0; the multiply also zeroes gradients flowing into padding.
    return weights * mask


class EmbeddingMLP(nn.Module):
    """Linear + ReLU + Dropout: maps frozen encoder features to a trainable instance embedding."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionPool(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018, eq. 8 and 9).

    Plain:  a_k = softmax_k( w^T tanh(V h_k) )
    Gated:  a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )

    The bag embedding is z = sum_k a_k h_k. Returns ``(z (B, D), a (B, N))`` with ``a`` exactly 0
    on padding and summing to 1 over each bag's real tiles.
    """

    def __init__(self, in_dim: int, attn_dim: int = 128, gated: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.gated = gated
        self.V = nn.Linear(in_dim, attn_dim)
        self.U = nn.Linear(in_dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores (B, N), before the softmax."""
        hidden = torch.tanh(self.V(h))
        if self.U is not None:
            hidden = hidden * torch.sigmoid(self.U(h))
        return self.w(self.dropout(hidden)).squeeze(-1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        weights = masked_softmax(self.scores(h), mask, dim=-1)
        pooled = torch.bmm(weights.unsqueeze(1), h).squeeze(1)
        return pooled, weights

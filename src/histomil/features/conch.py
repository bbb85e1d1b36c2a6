"""CONCH v1.5's image tower: a timm ViT-L/16 trunk and an attentional pooler (the ``conch_v15`` preset).

The network is what the published checkpoint (``MahmoodLab/conchv1_5``, ``pytorch_model_vision.bin``)
fills, as TRIDENT builds it to read that file strictly: ``trunk.*`` is a ViT-L/16 with layer scale
(timm's ``vit_large_patch16_224`` names), ``attn_pool_contrast.*`` a CoCa attentional pooler (Yu et al.
2022: one learned query attends over every token of the trunk, 8 heads, 768-d, no biases, layer norms
on the query and the tokens) and ``ln_contrast`` a final layer norm. The embedding is the pooled query
(768-d). Tiles are 448 px; the checkpoint's position embedding (a 14 x 14 grid) is brought to the 28 x 28
grid of 448-px tiles once, when the weights are loaded, the way TRIDENT's trunk does at every forward
pass (:func:`positions_for_448`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WIDTH, HEADS, PATCH, TILE = 768, 8, 16, 448
TRAINED_GRID = 14  # the trunk's grid as built by the reference code (224 / 16)


class AttentionalPooler(nn.Module):
    """Learned queries attending over a token sequence (CoCa's attentional pooler).

    ``query`` (n_queries, d_model) is layer-normed (``ln_q``) and projected (``to_q``); the tokens are
    layer-normed (``ln_k``) and projected to keys and values together (``to_kv``); multi-head scaled
    dot-product attention, then ``to_out``. (B, N, context_dim) -> (B, n_queries, d_model).
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, h = tokens.shape[0], self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        split = lambda t: t.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731 - (B, T, D) -> (B, h, T, D/h)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """(B, 3, 448, 448) ImageNet-normalised -> (B, 768): trunk tokens, attentional pooling, layer norm.
    ``trunk``: a timm ViT (ViT-L/16 with layer scale for the published weights) built for 448-px tiles."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(WIDTH, int(trunk.num_features), HEADS, n_queries=1)
        self.ln_contrast = nn.LayerNorm(WIDTH)
        self.dim = WIDTH

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])

    @staticmethod
    def adapt_state_dict(state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's tensors for this network: its position embedding on the 448-px grid."""
        key = "trunk.pos_embed"
        if key in state and isinstance(state[key], torch.Tensor) and state[key].dim() == 3:
            state = {**state, key: positions_for_448(state[key])}
        return state


def positions_for_448(pos_embed: torch.Tensor) -> torch.Tensor:
    """(1, 1 + g*g, C) class + grid position embedding -> (1, 1 + 28*28, C), as the reference trunk computes
    it: a grid other than 14 x 14 is first resampled to 14 x 14 (bilinear, as the reference loader does),
    then the 14 x 14 grid is upsampled bicubically with DINO's scale factor ((28 + 0.1) / 14, kept as
    given, not recomputed from the sizes)."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    side, width = math.isqrt(grid.shape[1]), grid.shape[2]
    if side * side != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patches is not a square grid")
    img = grid.float().reshape(1, side, side, width).permute(0, 3, 1, 2)
    if side != TRAINED_GRID:
        img = F.interpolate(img, size=(TRAINED_GRID, TRAINED_GRID), mode="bilinear", align_corners=False)
    out = TILE // PATCH
    scale = (out + 0.1) / TRAINED_GRID
    img = F.interpolate(img, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if img.shape[-2:] != (out, out):
        raise ValueError(f"position embedding resampled to {tuple(img.shape[-2:])}, expected {(out, out)}")
    return torch.cat([cls.float(), img.permute(0, 2, 3, 1).reshape(1, out * out, width)], dim=1).to(pos_embed.dtype)

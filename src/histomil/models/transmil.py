"""TransMIL: transformer-based correlated MIL (Shao et al. 2021, NeurIPS), written from the paper.

Per bag: fc (D -> 512, ReLU) -> "square" the sequence (append copies of the first tiles up to the
next square number H*W) -> prepend a class token -> Nystrom self-attention layer -> PPEG
(depthwise 7x7 + 5x5 + 3x3 convolutions over the tokens laid out as an H x W image, summed with
the identity) -> second Nystrom self-attention layer -> LayerNorm -> linear head on the class
token. Time and memory are linear in the number of tiles.

Nystrom attention (Xiong et al. 2021, AAAI): softmax(Q K^T / sqrt(d)) V is approximated by
F A^+ B V with landmarks Q~, K~ = means of ``num_landmarks`` contiguous segments of Q and K,
F = softmax(Q K~^T), A = softmax(Q~ K~^T), B = softmax(Q~ K^T) and A^+ the Moore-Penrose inverse by
the iterative method of Razavi et al. (2014) (6 iterations); plus the paper's depthwise
convolution skip on V. Sequences no longer than ``num_landmarks`` use exact softmax attention
(cheaper and exact there).

Padding: every bag is processed alone at its own length, so padded tiles never enter attention or
the convolutions and a bag gives the same output alone or in a padded batch.

``attention``: the class token's attention row (mean over heads) of the last layer, with the
copies made for squaring added back onto their source tiles, negatives (possible in the Nystrom
approximation) clipped to 0, renormalised over real tiles. It is an approximate importance map:
the class token also reads tiles through the PPEG and the first layer.

Not permutation invariant by design: PPEG encodes tile order as 2-D position.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from histomil.models.base import MILOutput
from histomil.models.pooling import check_bags, check_dropout


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of square matrices ``a`` (..., m, m) by the iterative method.

    Z0 = A^T / (||A||_1 ||A||_inf); Z <- Z/4 (13 I - A Z (15 I - A Z (7 I - A Z))).
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm1 = a.abs().sum(dim=-2).amax(dim=-1)  # max column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1)  # max row sum
    z = a.transpose(-1, -2) / (norm1 * norm_inf)[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(t: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous, near-equal segments along dim -2 of ``t`` (..., n, d), n >= m."""
    n = t.shape[-2]
    if n % m == 0:
        return t.reshape(*t.shape[:-2], m, n // m, t.shape[-1]).mean(dim=-2)
    seg = torch.arange(n, device=t.device) * m // n  # segment id of each position
    sums = t.new_zeros(*t.shape[:-2], m, t.shape[-1]).index_add_(-2, seg, t)
    counts = torch.bincount(seg, minlength=m).to(t.dtype)
    return sums / counts[:, None]


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention on (B, n, dim) without padding; linear in n."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_conv_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.dim_head = heads, dim // heads
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual_conv_kernel:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor, cls_row: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (output (B, n, dim), the first token's attention row (B, n) averaged over heads
        when ``cls_row`` else None)."""
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q = q * self.dim_head**-0.5
        m = self.num_landmarks
        row = None
        if n <= m:
            attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, h, n, n)
            out = attn @ v
            if cls_row:
                row = attn[:, :, 0].mean(dim=1)
        else:
            q_l, k_l = segment_means(q, m), segment_means(k, m)
            f = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, h, n, m)
            a_pinv = iterative_pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1), self.pinv_iterations)
            bmat = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, h, m, n)
            left = f @ a_pinv  # (B, h, n, m)
            out = left @ (bmat @ v)
            if cls_row:
                row = (left[:, :, :1] @ bmat).squeeze(2).mean(dim=1)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out), row


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom self-attention: x + attn(LayerNorm(x))."""

    def __init__(self, dim: int, **attn_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, **attn_kwargs)

    def forward(self, x: torch.Tensor, cls_row: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, row = self.attn(self.norm(x), cls_row)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depthwise 7x7, 5x5 and 3x3 convolutions over
    the tile tokens laid out as an H x W image (the class token passes through)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]
        img = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
        img = img + sum(conv(img) for conv in self.convs)
        return torch.cat([cls_token, img.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL: ``forward(x (B, N, D), mask (B, N) | None) -> MILOutput``.

    ``num_landmarks=None`` means ``dim // 2`` (the paper's 256 for dim 512).
    """

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        dim: int = 512,
        heads: int = 8,
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
        residual_conv_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 1 or dim < 1 or heads < 1 or pinv_iterations < 1:
            raise ValueError("in_dim, dim, heads and pinv_iterations must be >= 1 and n_classes (outputs: classes, or 1 for a value or risk) >= 1")
        check_dropout(dropout)
        if residual_conv_kernel < 0 or (residual_conv_kernel and residual_conv_kernel % 2 == 0):
            raise ValueError(f"residual_conv_kernel must be odd (or 0 for none), got {residual_conv_kernel}")
        landmarks = dim // 2 if num_landmarks is None else num_landmarks
        if landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {landmarks}")
        self.in_dim, self.n_classes = in_dim, n_classes
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        attn = {
            "heads": heads,
            "num_landmarks": landmarks,
            "pinv_iterations": pinv_iterations,
            "residual_conv_kernel": residual_conv_kernel,
            "dropout": dropout,
        }
        self.layer1 = TransLayer(dim, **attn)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, **attn)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bags(x, mask)
        logits, rows = [], []
        for b in range(x.shape[0]):  # each bag at its own length: padding never enters attention
            tiles = x[b, mask[b]] if not bool(mask[b].all()) else x[b]
            lg, row = self._one_bag(tiles)
            logits.append(lg)
            att = x.new_zeros(x.shape[1])
            att[mask[b]] = row
            rows.append(att)
        return MILOutput(logits=torch.stack(logits), attention=torch.stack(rows))

    def _one_bag(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = tiles.shape[0]
        h = self.fc(tiles.unsqueeze(0))  # (1, n, dim)
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        source = torch.arange(side * side, device=h.device) % n  # positions >= n copy the first tiles
        if extra:
            h = h[:, source]
        seq = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        seq, _ = self.layer1(seq)
        seq = self.ppeg(seq, side, side)
        seq, row = self.layer2(seq, cls_row=True)
        logits = self.head(self.norm(seq[:, 0]))[0]
        with torch.no_grad():
            tile_row = row[0, 1:].float().clamp(min=0)  # drop the class token's attention to itself
            att = torch.zeros(n, dtype=torch.float32, device=h.device).index_add_(0, source, tile_row)
            total = att.sum()
            att = att / total if total > 0 else torch.full_like(att, 1.0 / n)
        return logits, att.to(tiles.dtype)

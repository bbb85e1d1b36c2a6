"""Simple MIL baselines: mean and max pooling of tile embeddings, and instance-level max (mi-Net).

* ``mean_pool`` / ``max_pool`` (embedding-level MIL, "MI-Net" in Wang et al. 2018, Pattern
  Recognition): embedding MLP -> masked mean / max over tiles -> linear head.
* ``mi_net`` (instance-level MIL, Wang et al. 2018): an MLP scores every tile for every class, the
  bag logit of class c is the masked max over tiles of the tile logits for c.

Also holds the small helpers the other MIL models share (input checks, which class a heatmap
shows, max over real tiles).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from histomil.models.base import MILOutput
from histomil.models.layers import EmbeddingMLP, masked_softmax

# --- shared helpers ----------------------------------------------------------------------


def check_bags(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate ``x`` (B, N, D) and ``mask`` (B, N); returns a bool mask (all True when None).

    A bag without real tiles has no defined output; raise rather than return NaN.
    """
    if x.dim() != 3:
        raise ValueError(f"expected x of shape (B, N, D), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("bag has no tiles (N = 0)")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    mask = mask.to(dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match bags {tuple(x.shape[:2])}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("bag has no tiles (fully masked)")
    return mask


def heatmap_class(logits: torch.Tensor) -> torch.Tensor:
    """Which class a per-class model's ``attention`` shows, per bag (B,).

    Binary (2 classes): always the positive class 1, so heatmaps of all bags are comparable.
    More classes: the predicted class of each bag.
    """
    if logits.shape[-1] == 2:
        return torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits.detach().argmax(dim=-1)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over dim 1 of ``values`` (B, N, ...) ignoring padding (mask (B, N) False)."""
    fill = mask.view(*mask.shape, *([1] * (values.dim() - 2)))
    return values.masked_fill(~fill, float("-inf")).amax(dim=1)


def check_dropout(dropout: float) -> None:
    """A dropout probability must lie in [0, 1); shared by every model's constructor checks."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def _check_common(in_dim: int, n_classes: int, dropout: float, dims: Sequence[int] = ()) -> None:
    if in_dim < 1 or n_classes < 1 or any(d < 1 for d in dims):
        raise ValueError("in_dim and hidden sizes must be >= 1 and n_classes (outputs: classes, or 1 for a value or risk) >= 1")
    check_dropout(dropout)


# --- embedding-level pooling -------------------------------------------------------------


class _EmbeddingPool(nn.Module):
    """Embedding MLP -> (pooling over real tiles, in ``forward``) -> linear head."""

    permutation_invariant = True

    def __init__(self, in_dim: int, n_classes: int = 2, embed_dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        _check_common(in_dim, n_classes, dropout, (embed_dim,))
        self.in_dim, self.n_classes = in_dim, n_classes
        self.embed = EmbeddingMLP(in_dim, embed_dim, dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)


class MeanPoolMIL(_EmbeddingPool):
    """Embedding MLP -> mean over real tiles -> linear head.

    ``attention`` is the uniform 1/n over real tiles: exactly each tile's weight in the mean.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bags(x, mask)
        h = self.embed(x)
        weights = mask.to(h.dtype) / mask.sum(dim=1, keepdim=True).to(h.dtype)
        z = torch.bmm(weights.unsqueeze(1), h).squeeze(1)
        return MILOutput(logits=self.classifier(z), attention=weights, extras={"bag_embedding": z})


class MaxPoolMIL(_EmbeddingPool):
    """Embedding MLP -> per-dimension max over real tiles -> linear head.

    ``attention``: each tile's share of the embedding dimensions it supplies to the max-pooled bag
    embedding (ties split equally), so it sums to 1 over real tiles and is 0 for tiles that
    supply nothing. It measures which tiles the bag embedding is made of, not their sign of effect.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bags(x, mask)
        h = self.embed(x)
        z = masked_max(h, mask)  # (B, E)
        with torch.no_grad():
            winners = (h == z.unsqueeze(1)) & mask.unsqueeze(-1)  # (B, N, E)
            share = winners.to(h.dtype) / winners.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)
            attention = share.mean(dim=-1)
        return MILOutput(logits=self.classifier(z), attention=attention, extras={"bag_embedding": z})


# --- instance-level max ------------------------------------------------------------------


class MiNet(nn.Module):
    """mi-Net (Wang et al. 2018): tile MLP -> per-class tile logits -> masked max over tiles.

    ``hidden`` are the MLP widths (paper: 256, 128, 64, each followed by ReLU and dropout).
    ``instance_scores`` are the tile logits (B, N, C). ``attention`` is a softmax over real tiles of
    the tile logits for the heatmap class (class 1 when binary, else the predicted class): a
    smooth version of the one-hot argmax that decides the bag score, so the top tile is the one
    that sets the bag logit.
    """

    permutation_invariant = True

    def __init__(
        self, in_dim: int, n_classes: int = 2, hidden: Sequence[int] = (256, 128, 64), dropout: float = 0.5
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        _check_common(in_dim, n_classes, dropout, hidden)
        self.in_dim, self.n_classes = in_dim, n_classes
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU(), nn.Dropout(dropout)]
            prev = width
        layers.append(nn.Linear(prev, n_classes))
        self.scorer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bags(x, mask)
        scores = self.scorer(x)  # (B, N, C)
        logits = masked_max(scores, mask)
        cls = heatmap_class(logits)
        chosen = scores.detach().gather(2, cls.view(-1, 1, 1).expand(-1, scores.shape[1], 1)).squeeze(-1)
        attention = masked_softmax(chosen, mask, dim=-1)
        return MILOutput(logits=logits, attention=attention, instance_scores=scores)

"""The original project's MIL model ("SimpleModel"), re-implemented in PyTorch for comparison.

Written from the description in ORIGINAL.md (the Keras code is not copied). Per tile a small CNN
(Conv 2x2 x16, Conv 2x2 x16, MaxPool 2, Conv 2x2 x32, Conv 2x2 x32, MaxPool 2, Flatten, Dense
512-512-256 with dropout 0.5/0.5/0.2, all ReLU, Keras "valid" convolutions), gated attention
(Ilse et al. 2018) with a 1024-wide hidden layer, then each tile embedding is multiplied by its
attention weight and the N weighted embeddings are CONCATENATED in tile order and fed to a
2-way softmax (returned here as logits). Weights start as Keras would start them (Glorot-uniform
kernels, zero biases).

Pixels enter as floats in 0..255, unnormalised, exactly as in the original.

Why this is not histomil's default model (both flaws are inherited on purpose, to compare):

* **Fixed bag size.** The classifier reads a vector of ``bag_size * 256`` values, so the model
  only accepts bags of exactly ``bag_size`` tiles (40 in the original). Real slides give bags of
  any size; a different size raises a :class:`HistomilError`.
* **Tile order matters.** Concatenation gives every position its own classifier weights, so the
  same tiles in another order give another prediction, although a bag is an unordered set. With
  one tumour tile in 40, the classifier must learn to spot it at each of the 40 positions from
  its own examples, which is one reason the original misses W = 1 bags. Ilse et al.'s weighted
  SUM (histomil's ``abmil`` / ``gated_abmil``) is permutation invariant and size agnostic.

The tile CNN is also large for what it does: at 256x256 tiles the first dense layer sees
62 x 62 x 32 = 123,008 inputs (about 63 M weights), derived here from the tile size.
"""

from __future__ import annotations

import torch
from torch import nn

from histomil.errors import HistomilError
from histomil.models.base import MILOutput
from histomil.models.layers import AttentionPool, masked_softmax

EMBED_DIM = 256  # width of the tile embedding (last dense layer)
ATTENTION_DIM = 1024
DEFAULT_BAG_SIZE = 40


def flatten_dim(tile_size: int) -> int:
    """Inputs of the first dense layer for square tiles of ``tile_size`` px (123,008 at 256)."""
    side = tile_size
    for _ in range(2):  # two (conv 2x2, conv 2x2, maxpool 2) stages, valid padding
        side = (side - 2) // 2
    if side < 1:
        raise HistomilError(f"original model: tiles of {tile_size} px are too small (need at least 10 px)")
    return side * side * 32


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, Keras' defaults for Conv2D and Dense."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class OriginalTileCNN(nn.Module):
    """The original per-tile network: (T, 3, S, S) pixels in 0..255 -> (T, 256) embeddings."""

    def __init__(self, tile_size: int = 256) -> None:
        super().__init__()
        self.tile_size = int(tile_size)
        self.out_dim = EMBED_DIM
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 2), nn.ReLU(),
            nn.Conv2d(16, 16, 2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 2), nn.ReLU(),
            nn.Conv2d(32, 32, 2), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.dense = nn.Sequential(
            nn.Linear(flatten_dim(self.tile_size), 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, EMBED_DIM), nn.ReLU(), nn.Dropout(0.2),
        )  # fmt: skip
        _keras_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.tile_size, self.tile_size):
            raise HistomilError(
                f"original model: expected tiles of shape (T, 3, {self.tile_size}, {self.tile_size}), got {tuple(x.shape)}"
            )
        # Keras flattens channels-last (H, W, C); the order only permutes the dense weights.
        return self.dense(self.features(x).flatten(1))


class ConcatAttentionHead(nn.Module):
    """Gated attention, then the attention-weighted tile embeddings concatenated in tile order.

    ``forward(h (B, N, D), mask) -> MILOutput``; needs ``N == bag_size`` and no padding.
    """

    def __init__(self, in_dim: int = EMBED_DIM, n_classes: int = 2, bag_size: int = DEFAULT_BAG_SIZE,
                 attn_dim: int = ATTENTION_DIM) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 2 or bag_size < 1 or attn_dim < 1:
            raise ValueError("in_dim, bag_size and attn_dim must be >= 1 and n_classes >= 2")
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.bag_size = int(bag_size)
        self.attention = AttentionPool(in_dim, attn_dim=attn_dim, gated=True)  # only its scores are used
        self.classifier = nn.Linear(self.bag_size * in_dim, n_classes)
        _keras_init(self)

    def check_bag_size(self, n_tiles: int, bag: str = "") -> None:
        """Raise a one-line HistomilError unless a bag has exactly ``bag_size`` tiles."""
        if n_tiles != self.bag_size:
            raise HistomilError(
                f"{bag + ': ' if bag else ''}the original model needs bags of exactly {self.bag_size} tiles "
                f"(it concatenates them in order), got {n_tiles}; use a size-agnostic model such as gated_abmil"
            )

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if h.dim() != 3:
            raise ValueError(f"expected h of shape (B, N, D), got {tuple(h.shape)}")
        self.check_bag_size(h.shape[1])
        if mask is not None and not bool(mask.all()):
            raise HistomilError(f"original model: padded bags are not supported (every bag needs {self.bag_size} real tiles)")
        weights = masked_softmax(self.attention.scores(h), None, dim=-1)  # (B, N)
        weighted = h * weights.unsqueeze(-1)  # (B, N, D)
        logits = self.classifier(weighted.flatten(1))  # concatenation in tile order
        return MILOutput(logits=logits, attention=weights, extras={"bag_embedding": weighted.sum(dim=1)})


class OriginalMIL(nn.Module):
    """The whole original model: ``forward(x (B, N, 3, S, S) in 0..255, mask=None) -> MILOutput``."""

    def __init__(self, tile_size: int = 256, bag_size: int = DEFAULT_BAG_SIZE, n_classes: int = 2) -> None:
        super().__init__()
        self.tiles = OriginalTileCNN(tile_size)
        self.head = ConcatAttentionHead(EMBED_DIM, n_classes=n_classes, bag_size=bag_size)
        self.in_dim = EMBED_DIM
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if x.dim() != 5:
            raise HistomilError(f"original model: expected x of shape (B, N, 3, H, W), got {tuple(x.shape)}")
        b, n = x.shape[:2]
        self.head.check_bag_size(n)  # fail before spending the CNN on a bag it cannot classify
        h = self.tiles(x.flatten(0, 1)).view(b, n, -1)
        return self.head(h, mask)

"""The end-to-end pixel model: a tile encoder and a MIL head (see :mod:`histomil.training.pixels`).

Memory: backpropagating through 40 tiles stores every intermediate activation of 40 forward
passes. With ``tile_chunk=K`` the encoder runs on chunks of K tiles under
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant, which DistributedDataParallel supports):
only the (T, D) tile embeddings are kept, and each chunk's activations are recomputed during the
backward pass, so peak memory is that of K tiles (plus the embeddings) at the price of one extra
encoder forward pass. Results equal unchunked encoding up to float rounding. Without gradients
(frozen encoder, validation) tiles are simply encoded K at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from histomil.devices import compute_precision
from histomil.errors import HistomilError
from histomil.features.efficientnet_lite import EfficientNetLite0
from histomil.models.base import MILOutput
from histomil.training.common import takes_labels
from histomil.training.pixel_data import TilePrep


class EfficientNetEncoder(nn.Module):
    """EfficientNet-Lite0 features (T, 3, S, S) -> (T, 1280), always in eval mode.

    Eval mode freezes the BatchNorm statistics (their affine weights still train) and turns off
    stochastic depth, so a tile's embedding does not depend on which tiles share its chunk.
    """

    def __init__(self, backbone: EfficientNetLite0) -> None:
        super().__init__()
        backbone._fc = nn.Identity()  # the ImageNet classifier is not used
        backbone._dropout = nn.Identity()
        self.backbone = backbone
        self.out_dim = backbone.num_features
        super().train(False)

    def train(self, mode: bool = True) -> EfficientNetEncoder:  # always eval, see above
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


class PixelMIL(nn.Module):
    """A tile encoder and a MIL head: ``forward(x (B, N, 3, S, S), mask (B, N) | None) -> MILOutput``.

    ``encoder`` maps (T, 3, S, S) to (T, D); ``head`` is any MIL model taking (B, N, D).
    ``tile_chunk``: see the module docstring. ``precision="bf16"`` autocasts the encoder to
    bfloat16 (embeddings are cast back to float32 before the head). ``prep`` is the tile
    preprocessing the model expects (used by :func:`predict_pixels`).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, tile_chunk: int | None = None, precision: str = "fp32",
                 channels_last: bool = False, prep: TilePrep | None = None) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise HistomilError(f"unknown precision {precision!r}; choose fp32 or bf16")
        if tile_chunk is not None and tile_chunk < 1:
            raise HistomilError(f"tile_chunk must be at least 1, got {tile_chunk}")
        self.encoder = encoder
        self.head = head
        self.tile_chunk = tile_chunk
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.prep = prep
        self.in_dim = int(getattr(head, "in_dim", getattr(encoder, "out_dim", 0)))
        self.n_classes = int(getattr(head, "n_classes", 2))
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) -> (T, D) float32 embeddings, chunked (and checkpointed when training)."""
        if self.channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())
        chunk = self.tile_chunk or tiles.shape[0]
        with compute_precision(tiles.device, self.precision):
            if not needs_grad:
                with torch.no_grad():
                    parts = [self.encoder(c) for c in tiles.split(chunk)]
            elif tiles.shape[0] <= chunk:
                parts = [self.encoder(tiles)]
            else:
                parts = [checkpoint(self.encoder, c, use_reentrant=False) for c in tiles.split(chunk)]
        return torch.cat(parts).float()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, y: torch.Tensor | None = None) -> MILOutput:
        """Encode the tiles and run the head; bag labels ``y`` reach heads that use them (CLAM)."""
        if x.dim() != 5:
            raise HistomilError(
                f"end-to-end pixel model: expected tiles of shape (B, N, 3, H, W), got {tuple(x.shape)} "
                "(it takes tile images, not cached features)"
            )
        b, n = x.shape[:2]
        check = getattr(self.head, "check_bag_size", None)
        if check is not None:
            check(n)
        h = self.encode(x.flatten(0, 1)).view(b, n, -1)
        if y is not None and takes_labels(self.head):
            return self.head(h, mask, y=y)
        return self.head(h, mask)


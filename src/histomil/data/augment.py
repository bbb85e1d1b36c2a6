"""Training-time tile augmentation of the original project: flips, 90-degree rotation, transpose.

Each transform is a symmetry of the square (the dihedral group D4): it moves pixels without
changing any value, which suits H&E tiles (tissue has no canonical orientation). In the order
they are tried, each fires independently with probability ``p`` (0.2 in the original):

1. horizontal flip (mirror left-right),
2. vertical flip (mirror top-bottom),
3. rotation by k * 90 degrees, k drawn from {1, 2, 3} (counter-clockwise, as ``np.rot90``),
4. transpose (swap rows and columns).

(The original used a rotation that may draw k = 0, i.e. fires with an effective 0.75 p; here
``p`` is the chance that the tile actually rotates.)

Tiles are uint8 numpy arrays in (H, W, C) layout or torch tensors in (C, H, W) layout; leading
batch dimensions are allowed but then the whole stack gets the same transforms, so use
:func:`augment_tiles` for per-tile decisions. Randomness comes only from the numpy Generator
passed in, so a seeded generator reproduces the same augmentations.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Tile = TypeVar("Tile", np.ndarray, torch.Tensor)

DEFAULT_P = 0.2


def _axes(tile: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(row axis, column axis): (H, W) of HWC numpy arrays, of CHW tensors."""
    if tile.ndim < 2 + (1 if isinstance(tile, np.ndarray) else 0):
        raise ValueError(f"tile must be (H, W, C) for numpy or (C, H, W) for torch, got shape {tuple(tile.shape)}")
    return (-3, -2) if isinstance(tile, np.ndarray) else (-2, -1)


def hflip(tile: Tile) -> Tile:
    """Mirror left-right (reverse the columns)."""
    _, col = _axes(tile)
    return np.flip(tile, axis=col) if isinstance(tile, np.ndarray) else torch.flip(tile, dims=(col,))


def vflip(tile: Tile) -> Tile:
    """Mirror top-bottom (reverse the rows)."""
    row, _ = _axes(tile)
    return np.flip(tile, axis=row) if isinstance(tile, np.ndarray) else torch.flip(tile, dims=(row,))


def rot90(tile: Tile, k: int) -> Tile:
    """Rotate by ``k`` * 90 degrees counter-clockwise (``np.rot90`` convention)."""
    axes = _axes(tile)
    return np.rot90(tile, k, axes=axes) if isinstance(tile, np.ndarray) else torch.rot90(tile, k, dims=axes)


def transpose(tile: Tile) -> Tile:
    """Swap rows and columns (mirror about the main diagonal)."""
    row, col = _axes(tile)
    return np.swapaxes(tile, row, col) if isinstance(tile, np.ndarray) else tile.transpose(row, col)


def augment_tile(tile: Tile, rng: np.random.Generator, p: float = DEFAULT_P) -> Tile:
    """Apply each of the four transforms with probability ``p``; returns a contiguous copy."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
    out = tile
    if rng.random() < p:
        out = hflip(out)
    if rng.random() < p:
        out = vflip(out)
    if rng.random() < p:
        out = rot90(out, int(rng.integers(1, 4)))
    if rng.random() < p:
        out = transpose(out)
    return np.array(out, order="C") if isinstance(out, np.ndarray) else out.contiguous().clone()


def augment_tiles(tiles: list[Tile], rng: np.random.Generator, p: float = DEFAULT_P) -> list[Tile]:
    """Augment each tile independently (its own random draws), in order."""
    return [augment_tile(t, rng, p) for t in tiles]

"""Tile bags for end-to-end training: read, augmented and preprocessed in DataLoader workers.

:class:`TilePrep` turns uint8 RGB tiles into the float tensors a pixel model takes; :func:`iter_bags`
yields one bag's tiles at a time (reading, augmenting and preprocessing them in worker processes).
Each bag's augmentation is seeded by its :class:`TileTask`, so the tiles a bag gets do not depend on
the worker count, nor on which torchrun rank reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from histomil.data.augment import augment_tile
from histomil.data.images import read_rgb
from histomil.errors import HistomilError


@dataclass(frozen=True)
class TilePrep:
    """uint8 RGB (H, W, 3) tiles -> float (T, 3, size, size), resized (bilinear, antialiased).

    ``raw=True`` keeps pixels in 0..255 (the original model); otherwise ``(x / 255 - mean) / std``
    in the same order of operations as :meth:`TileEncoder.preprocess`.
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    raw: bool = False

    def __call__(self, tiles: Sequence[np.ndarray]) -> torch.Tensor:
        out = torch.empty((len(tiles), 3, self.size, self.size), dtype=torch.float32)
        for i, tile in enumerate(tiles):
            tile = np.asarray(tile)
            if not tile.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
                tile = tile.copy()
            x = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float().unsqueeze(0)
            if not self.raw:
                x = x / 255.0
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            out[i] = x[0]
        if not self.raw:
            out = (out - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        return out

    def info(self, name: str, dim: int) -> dict[str, Any]:
        """Encoder info for checkpoints (kind ``pixels``: the model takes tiles, not features)."""
        return {"name": name, "input_size": self.size, "mean": list(self.mean), "std": list(self.std),
                "dim": dim, "raw_pixels": self.raw, "kind": "pixels"}



@dataclass(frozen=True)
class TileTask:
    """One bag to read: its tile files, and the seed of its augmentation."""

    index: int  # position in the caller's bag list
    paths: tuple[Path, ...]
    seed: int  # augmentation seed for this bag and epoch


class TileBags(Dataset):
    """Reads, augments and preprocesses one bag per item (in a worker process).

    Returns ``(index, tiles, None)`` or ``(index, None, error message)``: exceptions are passed
    as text because DataLoader cannot re-raise exceptions whose constructor takes two arguments.
    """

    def __init__(self, tasks: list[TileTask], prep: TilePrep, augment_p: float) -> None:
        self.tasks, self.prep, self.augment_p = tasks, prep, augment_p

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        task = self.tasks[i]
        try:
            tiles = [read_rgb(p) for p in task.paths]
            if self.augment_p > 0:
                rng = np.random.default_rng(task.seed)
                tiles = [augment_tile(t, rng, self.augment_p) for t in tiles]
            return task.index, self.prep(tiles), None
        except HistomilError as exc:
            return task.index, None, str(exc)


def identity(item: Any) -> Any:
    """DataLoader collate function: a bag is already one item."""
    return item


def iter_bags(tasks: list[TileTask], prep: TilePrep, augment_p: float, num_workers: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(index, tiles (N, 3, S, S))`` in task order; a bad tile -> HistomilError."""
    loader = DataLoader(
        TileBags(tasks, prep, augment_p), batch_size=None, shuffle=False, num_workers=num_workers,
        collate_fn=identity, generator=torch.Generator().manual_seed(seed),
    )
    for index, tiles, error in loader:
        if error is not None:
            raise HistomilError(error)
        yield index, tiles


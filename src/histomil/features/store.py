"""Per-bag feature files (HDF5), written atomically and self-describing.

Layout of one file ``<bag_id>.h5``:

* dataset ``features``: (N, D) float32, one row per tile, in the bag's tile order;
  attribute ``encoder`` (the encoder name).
* dataset ``tile_paths``: (N,) UTF-8 strings, the tiles' paths as the bag listed them.
* dataset ``coords`` (optional): (N, 2) int, level-0 top-left tile coordinates for slide bags.
* file attributes: ``bag_id``, ``label`` (-1 when unknown), ``target`` (optional float array: a
  regression value or a survival (time, event) pair), ``encoder``, ``input_size``,
  ``mean``, ``std`` (normalisation), ``feature_dim``, ``histomil_version``.

A folder of such files, plus optional ``labels.csv`` / ``tiles.csv`` beside them, is a
*feature dataset* that training, evaluation and prediction read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from histomil import __version__
from histomil.errors import HistomilError
from histomil.files import atomic_write


@dataclass
class FeatureBag:
    """One bag's tile features as read from (or written to) a feature file."""

    bag_id: str
    features: np.ndarray  # (N, D) float32
    tile_paths: list[str]
    label: int | None = None  # class index (classification)
    coords: np.ndarray | None = None  # (N, 2) level-0 pixels, slide bags only
    attrs: dict[str, Any] = field(default_factory=dict)  # encoder name, input size, normalisation
    # Continuous target: (value,) for regression, (time, event) for survival (histomil.training.tasks).
    target: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """(tiles, feature dim); a lazy bag (:mod:`histomil.features.lazy`) answers without reading its file."""
        return tuple(self.features.shape)


def write_feature_bag(path: str | Path, bag: FeatureBag) -> None:
    """Write ``bag`` to ``path`` atomically: readers never see a half-written file."""
    path = Path(path)
    feats = np.asarray(bag.features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != len(bag.tile_paths):
        raise ValueError(f"features {feats.shape} do not match {len(bag.tile_paths)} tile paths")
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("features", data=feats)
        ds.attrs["encoder"] = str(bag.attrs.get("encoder", "unknown"))
        f.create_dataset("tile_paths", data=np.array(bag.tile_paths, dtype=object), dtype=h5py.string_dtype())
        if bag.coords is not None:
            f.create_dataset("coords", data=np.asarray(bag.coords, dtype=np.int64))
        f.attrs["bag_id"] = bag.bag_id
        f.attrs["label"] = -1 if bag.label is None else int(bag.label)
        if bag.target is not None:
            f.attrs["target"] = np.asarray(bag.target, dtype=np.float64).reshape(-1)
        f.attrs["feature_dim"] = int(feats.shape[1])
        f.attrs["histomil_version"] = __version__
        for key, value in bag.attrs.items():
            f.attrs[key] = value


def read_feature_bag(path: str | Path) -> FeatureBag:
    """Read one feature file; a file that is not one says so in one line."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise HistomilError(f"{path}: not a histomil feature file (no 'features' dataset)")
            feats = np.asarray(f["features"][()], dtype=np.float32)
            paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["tile_paths"][()]] if "tile_paths" in f else [
                str(i) for i in range(feats.shape[0])
            ]
            coords = np.asarray(f["coords"][()]) if "coords" in f else None
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # h5py's errors on truncated or damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise HistomilError(f"{path}: cannot read feature file, truncated or damaged? ({first})") from None
    label = attrs.pop("label", -1)
    target = attrs.pop("target", None)
    bag_id = str(attrs.pop("bag_id", path.stem))
    return FeatureBag(
        bag_id=bag_id,
        features=feats,
        tile_paths=paths,
        label=None if label is None or int(label) < 0 else int(label),
        coords=coords,
        attrs=attrs,
        target=None if target is None else tuple(float(v) for v in np.atleast_1d(target)),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def pad_batch(bags: Sequence[FeatureBag] | Sequence[np.ndarray]) -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """Stack bags of different sizes into a zero-padded (B, N, D) tensor and a (B, N) bool mask."""
    import torch

    arrays = [b.features if isinstance(b, FeatureBag) else b for b in bags]
    n_max = max(a.shape[0] for a in arrays)
    dim = arrays[0].shape[1]
    x = torch.zeros(len(arrays), n_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(arrays), n_max, dtype=torch.bool)
    for i, a in enumerate(arrays):
        x[i, : a.shape[0]] = torch.as_tensor(a, dtype=torch.float32)
        mask[i, : a.shape[0]] = True
    return x, mask

"""Where a feature file's tiles lie on the slide: level-0 coordinates and tile size, for any layout.

Part of the one feature reader (:mod:`histomil.features.formats`): CLAM's h5_files record no tile size
(its ``patches/<slide>.h5`` does), pt files no coordinates (CLAM's ``patches/<slide>.h5`` and TRIDENT's
``patches/<slide>_patches.h5`` do), STAMP records micrometres (v2) or pixels of 224-px tiles of
256 µm (v1), which need the slide's µm/px. A fact no file records stays unknown, with the reason,
and :func:`require_geometry` turns it into one line naming the file and what to pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag

#: STAMP v1 (no ``unit``): coordinates are pixels of tiles of 224 px covering 256 µm.
STAMP_V1_TILE_PX, STAMP_V1_TILE_UM = 224, 256.0
#: what h5py and numpy raise on truncated or damaged files.
READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


def plain(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type name when it has none), at most 200 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def coords_matrix(path: Path, raw: Any, n: int, where: str = "coords") -> np.ndarray:
    """The (n, 2) x, y columns of a stored coordinates array; a wrong shape or a non-finite value is refused."""
    arr = np.asarray(raw)
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] != n:
        raise HistomilError(f"{path}: '{where}' has shape {arr.shape}; expected ({n}, 2), one (x, y) per feature row")
    arr = arr[:, :2]
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr.astype(np.float64)).all():
        raise HistomilError(f"{path}: '{where}' has NaN, infinite or non-numeric values")
    return arr


def level0_tile_size(attrs: Mapping[str, Any]) -> int | None:
    """Tile edge in level-0 pixels from ``coords`` attributes (TRIDENT, CLAM patches, histomil), or None."""
    if attrs.get("patch_size_level0") is not None:
        return int(round(float(attrs["patch_size_level0"])))
    if attrs.get("patch_size") is None or "target_magnification" in attrs:  # TRIDENT's patch_size is not level 0
        return None
    size = float(attrs["patch_size"])
    level = attrs.get("patch_level")
    if level is not None and int(level) == 0:
        return int(round(size))
    down = attrs.get("downsample")
    if level is None or down is None:
        return None  # the size at an unknown level: the slide's downsample is needed
    factor = float(np.ravel(down)[0])
    return int(round(size * factor)) if np.isfinite(factor) and factor > 0 else None


def agree_tile_size(path: Path, recorded: int | None, given: int | None) -> int | None:
    """The tile size to use: the recorded one, else the one given; a contradiction is refused."""
    if given is None:
        return recorded
    if recorded is not None and abs(recorded - int(given)) > 1:
        raise HistomilError(f"{path}: records tiles of {recorded} level-0 pixels, --tile-size-level0 says {int(given)}")
    return recorded if recorded is not None else int(given)


def find_sidecar(
    path: Path, kind: str, features: np.ndarray, coords: np.ndarray | None, coord_attrs: Mapping[str, Any],
    coords_dir: Path | None,
) -> tuple[np.ndarray, dict[str, Any], Path] | None:
    """Coordinates + attributes from the tool's patches file for this slide, when they fit this file.

    An explicit ``coords_dir`` that has no fitting file is an error; the tool's own sibling
    ``patches/`` folder (CLAM ``<out>/patches/<slide>.h5``, TRIDENT ``<run>/patches/<slide>_patches.h5``)
    is used only when it fits and silently skipped otherwise.
    """
    if kind == "histomil" or (coords is not None and kind == "trident"):
        return None
    names = (f"{path.stem}.h5", f"{path.stem}_patches.h5")
    if coords_dir is not None:
        found = next((coords_dir / n for n in names if (coords_dir / n).is_file()), None)
        if found is None:
            raise HistomilError(f"{coords_dir}: no coordinates file for {path.name} ({' or '.join(names)})")
        side = read_coords_file(found)
        problem = _misfit(features, coords, side[0])
        if problem:
            raise HistomilError(f"{found}: {problem} of {path}")
        return (*side, found)
    if coords is not None and coord_attrs:
        return None  # the file carries its own coordinates and geometry
    found = next((path.parent.parent / "patches" / n for n in names if (path.parent.parent / "patches" / n).is_file()), None)
    if found is None:
        return None
    try:
        side = read_coords_file(found)
    except HistomilError:
        return None
    return None if _misfit(features, coords, side[0]) else (*side, found)


def _misfit(features: np.ndarray, own: np.ndarray | None, coords: np.ndarray) -> str | None:
    if coords.shape[0] != features.shape[0]:
        return f"holds {coords.shape[0]} coordinates for the {features.shape[0]} feature rows"
    if own is not None and not np.array_equal(np.asarray(own, np.int64), coords.astype(np.int64)):
        return "holds other coordinates than the feature file"
    return None


def read_coords_file(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``coords`` and its attributes from a CLAM or TRIDENT patches file."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise HistomilError(f"{path}: no 'coords' dataset (has: {', '.join(f.keys()) or 'nothing'})")
            arr = np.asarray(f["coords"][()])
            attrs = {k: plain(v) for k, v in f["coords"].attrs.items()}
    except READ_ERRORS as exc:
        raise HistomilError(f"{path}: cannot read coordinates file ({first_line(exc)})") from None
    return coords_matrix(path, arr, arr.shape[0] if arr.ndim == 2 else -1), attrs


def stamp_geometry(path: Path, file_attrs: Mapping[str, Any], coords: np.ndarray | None, mpp: float | None,
                   attrs: dict[str, Any]) -> tuple[np.ndarray | None, int | None]:
    """STAMP coordinates and tile size in level-0 pixels (None, with the reason in ``attrs``, without ``mpp``)."""
    if str(file_attrs.get("feat_type", "tile")) != "tile":
        raise HistomilError(f"{path}: STAMP features of type {file_attrs['feat_type']!r}, not per-tile features")
    for k in ("tile_size_um", "tile_size_px", "stamp_version"):
        if k in file_attrs:
            attrs[k] = file_attrs[k]
    if "unit" in file_attrs:
        unit = str(file_attrs["unit"]).lower()
        if "tile_size_um" not in attrs and "tile_size" in file_attrs:  # STAMP 2.0 called it tile_size
            attrs["tile_size_um"] = file_attrs["tile_size"]
        if unit in ("px", "pixel", "pixels"):
            return coords, None if "tile_size_um" not in attrs or mpp is None else round(float(attrs["tile_size_um"]) / mpp)
        if unit not in ("um", "micron", "microns", "µm"):
            raise HistomilError(f"{path}: STAMP coordinate unit {unit!r} is unknown (expected 'um' or 'px')")
        um = None if coords is None else coords.astype(np.float64)
        attrs["stamp_layout"] = "v2"
    else:  # STAMP v1: pixels of 224-px tiles that cover 256 µm
        tile_px = float(file_attrs.get("tile_size_px", STAMP_V1_TILE_PX))
        tile_um = float(file_attrs.get("tile_size_um", file_attrs.get("tile_size", STAMP_V1_TILE_UM)))
        attrs["stamp_layout"] = "v1"
        attrs.setdefault("tile_size_um", tile_um)
        um = None
        if coords is not None:
            stride = _grid_stride(coords)
            if stride is not None and abs(stride - tile_px) > 1:
                attrs["coords_missing"] = (f"STAMP v1 file (no 'unit') whose coordinates step by {stride:g}, not by its "
                                           f"{tile_px:g}-px tiles: their unit is unknown")
                return None, None
            um = coords.astype(np.float64) * (tile_um / tile_px)
    if mpp is None:
        if um is not None:
            attrs["coords_missing"] = "STAMP coordinates are micrometres; give the slide's micrometres per pixel (--slide-mpp)"
        attrs["tile_size_missing"] = "STAMP tile sizes are micrometres; give the slide's micrometres per pixel (--slide-mpp)"
        return None, None
    size = round(float(attrs["tile_size_um"]) / mpp) if "tile_size_um" in attrs else None
    return (None if um is None else um / mpp), size


def _grid_stride(coords: np.ndarray) -> float | None:
    """The smallest positive step between distinct x (or y) coordinates; None for a single column/row."""
    steps = [np.diff(np.unique(coords[:, i].astype(np.float64))) for i in (0, 1)]
    steps = [s[s > 1e-6] for s in steps if s.size]
    return float(min(s.min() for s in steps if s.size)) if any(s.size for s in steps) else None


def require_geometry(bag: FeatureBag) -> tuple[np.ndarray, int]:
    """``(coords, tile size)`` in level-0 pixels for drawing a bag on its slide, or one line naming
    the file and the missing fact (what to pass to supply it)."""
    where = bag.attrs.get("source_file", f"bag {bag.bag_id}")
    if bag.coords is None:
        why = bag.attrs.get("coords_missing", "the file stores no tile coordinates")
        raise HistomilError(f"{where}: no level-0 coordinates: {why}")
    size = bag.attrs.get("patch_size_level0")
    if size is None:
        why = bag.attrs.get("tile_size_missing", "the file records no tile size")
        raise HistomilError(f"{where}: no level-0 tile size: {why}")
    return bag.coords, int(size)

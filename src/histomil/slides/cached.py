"""Slide bags from feature files extracted before, by histomil, CLAM, TRIDENT or STAMP.

So ``histomil heatmap`` and ``histomil predict-slides --features`` predict and draw from cached
features with no encoder and no re-extraction: the feature file gives the features, the one feature
reader (:mod:`histomil.features.formats`) gives level-0 coordinates and the tile size at level 0 (from
the file, the tiler's ``patches/`` sidecar, ``coords_dir`` or an explicit size; nothing is guessed: a
grid step is not a tile size, CLAM cuts 256-px tiles at step 128), and the slide gives the overview
and its um/px (for STAMP's micrometres). This module adds what only the slide can check: the file
names this slide, and every tile lies on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histomil.errors import HistomilError
from histomil.features.formats import FEATURE_SUFFIXES, load_any_features
from histomil.features.geometry import require_geometry
from histomil.features.store import FeatureBag
from histomil.slides.reader import Slide

#: Sub-folders of a CLAM output folder that hold its feature files, in order of preference.
CLAM_FEATURE_DIRS = ("h5_files", "pt_files")


def find_feature_file(features: str | Path, stem: str) -> Path:
    """The feature file of slide ``stem``: ``features`` itself when it is a file, else ``<stem>.h5``
    (``.hdf5``, ``.pt``, ``.pth``) in the folder or in a CLAM output folder's ``h5_files``/``pt_files``."""
    features = Path(features)
    if features.is_file():
        return features
    if not features.is_dir():
        raise HistomilError(f"{features}: no such feature file or folder")
    for folder in (features, *(features / d for d in CLAM_FEATURE_DIRS)):
        for suffix in FEATURE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise HistomilError(f"{features}: no feature file for slide {stem} (looked for {stem}{'/'.join(FEATURE_SUFFIXES)})")


def slide_bag_from_features(
    slide: Slide,
    feature_file: str | Path,
    coords_dir: str | Path | None = None,
    tile_size_level0: int | None = None,
) -> FeatureBag:
    """The bag of ``feature_file`` with level-0 ``coords`` and ``attrs["patch_size_level0"]`` settled.

    ``coords_dir`` (the tiler's coordinates files) and ``tile_size_level0`` supply what the file does
    not record (see :func:`~histomil.features.formats.load_any_features`); a missing fact, a file of
    another slide or tiles off the slide stop with one line naming the file.
    """
    feature_file = Path(feature_file)
    bag = load_any_features(feature_file, mpp=slide.mpp, tile_size=tile_size_level0, coords_dir=coords_dir)
    recorded = bag.attrs.get("slide_name")
    if recorded and str(recorded) != slide.path.stem:
        raise HistomilError(f"{feature_file}: holds the features of slide {recorded}, not of {slide.path.name}")
    if bag.coords is not None and bag.attrs.get("patch_size_level0") is None:
        raise HistomilError(f"{feature_file}: records no tile size (CLAM h5_files record none); pass --coords with "
                            "the tiler's patches folder or --tile-size-level0")
    coords, size = require_geometry(bag)
    _check_on_slide(feature_file, coords, size, slide)
    return bag


def _check_on_slide(path: Path, coords: np.ndarray, size: int, slide: Slide) -> None:
    """Every tile's top-left corner lies on the slide (else the file belongs to another slide or scale)."""
    w, h = slide.dimensions
    c = np.asarray(coords)
    off = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] >= w) | (c[:, 1] >= h)
    if off.any():
        x, y = c[np.argmax(off)]
        raise HistomilError(f"{path}: {int(off.sum())} of {len(c)} tiles lie outside {slide.path.name} "
                            f"({w} x {h} px), e.g. at ({int(x)}, {int(y)}): features of another slide?")

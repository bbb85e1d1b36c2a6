"""The one reader of tile-feature files: histomil's own, CLAM, TRIDENT and STAMP, normalised.

So features extracted once with CLAM, TRIDENT or STAMP (often with large foundation-model encoders)
can be trained on, evaluated, predicted and drawn with histomil without re-extraction. Every command
reads feature files through :func:`load_any_features` / :func:`load_features_folder`. Layouts:

* ``histomil``: our own per-bag HDF5 (``features``, ``tile_paths``, file attributes; see
  :mod:`histomil.features.store`). Slide feature files also carry CLAM/TRIDENT ``coords`` attributes.
* ``clam``: CLAM ``h5_files/<slide>.h5``: ``features`` (N, D) and ``coords`` (N, 2) with no
  attributes at all (the tile size is in CLAM's ``patches/<slide>.h5``).
* ``trident``: TRIDENT ``features_<encoder>/<slide>.h5``: the same datasets, recognised by the TRIDENT
  attributes on ``coords`` (``patch_size_level0``, ...); ``features`` may be float16.
* ``stamp``: STAMP ``<slide>.h5`` with ``feats`` and ``coords``: micrometres when the file attribute
  ``unit`` is ``"um"`` (v2), pixels of 224-px tiles of 256 µm when there is no ``unit`` (v1).
* ``pt``: CLAM ``pt_files/<slide>.pt`` (a tensor) or TRIDENT ``features_<encoder>_pt/<slide>.pt`` (a
  numpy array, often float16): features only.

What every bag holds afterwards (``FeatureBag``): ``features`` float32 whatever was stored;
``coords`` level-0 pixels, top-left, or None; ``tile_paths`` ``"x_y"`` from those coordinates (row
numbers without them; histomil's tile paths for its own bags); ``attrs`` with

* ``source_file``, ``source_format`` (a layout above), ``source_tool`` and ``source_version`` (when
  recorded), ``stored_dtype`` (e.g. ``float16``), ``precision`` (when the file records one);
* ``encoder`` (as the file names it) and ``encoder_canonical`` (:func:`canonical_encoder`);
* ``patch_size_level0``: the tile edge in level-0 pixels (TRIDENT's own attribute; CLAM
  ``patch_size`` at ``patch_level`` x ``downsample``; STAMP ``tile_size_um / mpp``).

A fact a layout does not record (CLAM h5_files: tile size; pt files: coordinates; STAMP: the slide's
µm/px) comes from an argument (``tile_size``, ``coords_dir``, ``mpp``) or from the tool's own sidecar
file beside it (CLAM ``patches/<slide>.h5``, TRIDENT ``patches/<slide>_patches.h5``), used only when
its coordinates are those of the feature file (or, for coordinate-less pt files, as many). Otherwise
the fact stays unknown: ``attrs["coords_missing"]`` / ``attrs["tile_size_missing"]`` say why, and
:func:`histomil.features.geometry.require_geometry` stops a command that needs it with one line naming the file and the fact.
Nothing is guessed.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histomil.errors import HistomilError
from histomil.features.geometry import (
    READ_ERRORS,
    agree_tile_size,
    coords_matrix,
    find_sidecar,
    first_line,
    level0_tile_size,
    plain,
    stamp_geometry,
)
from histomil.features.shards import check_complete
from histomil.features.store import FeatureBag, read_feature_bag
from histomil.features.validate import canonical_encoder, check_finite

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth")
FORMATS = ("histomil", "clam", "trident", "stamp", "pt")
SOURCE_TOOLS = {"histomil": "histomil", "clam": "CLAM", "trident": "TRIDENT", "stamp": "STAMP", "pt": "torch"}
#: ``coords`` attributes that only TRIDENT writes (CLAM writes patch_size/patch_level/downsample...).
_TRIDENT_KEYS = {"patch_size_level0", "level0_magnification", "target_magnification", "savetodir"}
#: attributes worth keeping on the bag: they tell how large a tile is on the slide.
_GEOMETRY_KEYS = ("patch_size_level0", "patch_size", "patch_level", "downsample", "tile_size", "level0_magnification",
                  "target_magnification", "tile_size_um", "tile_size_px")


@dataclass
class _Raw:
    """What one file stores, before normalisation."""

    kind: str
    features: np.ndarray
    stored_dtype: str
    coords: np.ndarray | None = None
    coord_attrs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)  # file + features attributes, file first
    tile_paths: list[str] | None = None
    label: int | None = None
    target: tuple[float, ...] | None = None  # a histomil file's regression / survival target


def _describe(f: h5py.File) -> str:
    """'datasets a (3, 4), b (3,); attributes x, y' for error messages."""
    items = []
    f.visititems(lambda name, obj: items.append(f"{name} {tuple(obj.shape)}") if isinstance(obj, h5py.Dataset) else None)
    keys = ", ".join(items) or "none"
    attrs = ", ".join(sorted(f.attrs.keys())) or "none"
    return f"datasets: {keys}; attributes: {attrs}"


def _feature_matrix(path: Path, raw: Any, key: str) -> tuple[np.ndarray, str]:
    """A finite float32 (N, D) matrix from what a file stores, and the stored dtype's name."""
    arr = np.asarray(raw)
    while arr.ndim > 2 and arr.shape[0] == 1:  # some tools save (1, N, D)
        arr = arr[0]
    if arr.ndim == 1:
        raise HistomilError(
            f"{path}: '{key}' has shape {arr.shape}: one vector per slide (a slide embedding), not one per tile"
        )
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HistomilError(f"{path}: '{key}' has shape {arr.shape}; expected (tiles, feature dim) with at least one tile")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise HistomilError(f"{path}: '{key}' holds {arr.dtype} values, not real numbers")
    out = arr.astype(np.float32)
    check_finite(out, path, key)
    return out, str(arr.dtype)


# --------------------------------------------------------------------------------- detection


def detect_format(path: str | Path) -> str:
    """The layout of a feature file: one of :data:`FORMATS`; unknown layouts raise HistomilError."""
    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth"):
        return "pt"
    with _open_h5(path) as f:
        return _detect_h5(path, f)


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise HistomilError(f"{path}: feature file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise HistomilError(f"{path}: not a readable HDF5 feature file ({first_line(exc)})") from None


def _detect_h5(path: Path, f: h5py.File) -> str:
    if "features" in f and isinstance(f["features"], h5py.Dataset):
        if "tile_paths" in f or "histomil_version" in f.attrs:
            return "histomil"
        if "coords" in f and _TRIDENT_KEYS & set(f["coords"].attrs.keys()):
            return "trident"
        return "clam"
    if "feats" in f and isinstance(f["feats"], h5py.Dataset):
        return "stamp"
    raise HistomilError(
        f"{path}: unknown feature layout (expected 'features' [histomil, CLAM, TRIDENT] or 'feats' [STAMP]); {_describe(f)}"
    )


# ----------------------------------------------------------------------------------- reading


def load_any_features(
    path: str | Path,
    mpp: float | None = None,
    label: int | None = None,
    *,
    tile_size: int | None = None,
    coords_dir: str | Path | None = None,
) -> FeatureBag:
    """Read one feature file of any supported layout (detected from its content) as a normalised bag.

    Args:
        path: ``.h5``/``.hdf5`` (histomil, CLAM, TRIDENT, STAMP) or ``.pt``/``.pth`` (a tensor N x D).
        mpp: the slide's level-0 micrometres per pixel: turns STAMP's micrometres into level-0 pixels.
        label: the bag label, overriding one stored in the file (histomil files store theirs).
        tile_size: tile edge in level-0 pixels, for layouts that do not record it (CLAM h5_files);
            it must agree with a size the file records.
        coords_dir: a folder of CLAM ``<slide>.h5`` or TRIDENT ``<slide>_patches.h5`` coordinate files:
            coordinates for pt files, the tile size for CLAM h5 files.
    """
    path = Path(path)
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise HistomilError(f"{path}: the slide resolution must be a positive number of micrometres per pixel, got {mpp!r}")
    if tile_size is not None and not (int(tile_size) == tile_size and tile_size > 0):
        raise HistomilError(f"{path}: the tile size must be a positive whole number of level-0 pixels, got {tile_size!r}")
    raw = _read_pt(path) if path.suffix.lower() in (".pt", ".pth") else _read_h5(path)
    bag = _normalise(path, raw, mpp, tile_size, Path(coords_dir) if coords_dir is not None else None)
    if label is not None:
        bag.label = int(label)
    return bag


def _read_h5(path: Path) -> _Raw:
    with _open_h5(path) as f:
        kind = _detect_h5(path, f)
    if kind == "histomil":
        bag = read_feature_bag(path)
    key = "feats" if kind == "stamp" else "features"
    try:
        with h5py.File(path, "r") as f:
            stored = f[key]
            feats, dtype = _feature_matrix(path, bag.features if kind == "histomil" else stored[()], key)
            dtype = str(stored.dtype)
            attrs = {k: plain(v) for k, v in f.attrs.items()}
            for k, v in stored.attrs.items():
                attrs.setdefault(k, plain(v))
            raw = _Raw(kind, feats, dtype, attrs=attrs)
            if "coords" in f:
                raw.coords = coords_matrix(path, f["coords"][()], feats.shape[0])
                raw.coord_attrs = {k: plain(v) for k, v in f["coords"].attrs.items()}
    except READ_ERRORS as exc:
        raise HistomilError(f"{path}: cannot read feature file, truncated or damaged? ({first_line(exc)})") from None
    if kind == "histomil":
        raw.tile_paths, raw.label, raw.target = bag.tile_paths, bag.label, bag.target
        for k in ("label", "bag_id", "target"):
            raw.attrs.pop(k, None)
    return raw


def _torch_load(path: Path) -> Any:
    """``torch.load`` without arbitrary unpickling; numpy arrays (TRIDENT saves one) allowed."""
    import torch
    from torch.serialization import safe_globals

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    try:
        with safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise HistomilError(f"{path}: not a readable torch feature file ({first_line(exc)})") from None


def _read_pt(path: Path) -> _Raw:
    import torch

    if not path.is_file():
        raise HistomilError(f"{path}: feature file not found")
    data = _torch_load(path)
    coords = None
    if isinstance(data, Mapping):
        key = next((k for k in ("features", "feats") if k in data), None)
        if key is None:
            raise HistomilError(
                f"{path}: a dict without 'features' or 'feats' (keys: {', '.join(map(str, data.keys())) or 'none'})"
            )
        raw, coords = data[key], data.get("coords")
    else:
        key, raw = "tensor", data
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu()
        raw = raw.float().numpy() if raw.dtype == torch.bfloat16 else raw.numpy()  # numpy has no bfloat16
    if not isinstance(raw, np.ndarray):
        raise HistomilError(f"{path}: holds a {type(raw).__name__}, not a feature tensor (tiles x feature dim)")
    feats, dtype = _feature_matrix(path, raw, key)
    out = _Raw("pt", feats, dtype)
    if coords is not None:
        out.coords = coords_matrix(path, coords.cpu().numpy() if isinstance(coords, torch.Tensor) else coords, len(feats))
    out.attrs["source_tool"] = "CLAM" if path.parent.name == "pt_files" else "torch"
    encoder = _encoder_from_folder(path)
    if encoder:
        out.attrs["source_tool"] = "TRIDENT"
        out.attrs["encoder"] = encoder
        out.attrs["encoder_source"] = f"folder name {path.parent.name}"
    return out


def _encoder_from_folder(path: Path) -> str | None:
    """TRIDENT names its feature folders ``features_<encoder>`` (``features_<encoder>_pt`` for .pt)."""
    name = path.parent.name
    if not name.startswith("features_") or len(name) <= len("features_"):
        return None
    enc = name[len("features_"):]
    return enc[: -len("_pt")] if enc.endswith("_pt") and len(enc) > 3 else enc


# ----------------------------------------------------------------------------- normalisation


def _normalise(path: Path, raw: _Raw, mpp: float | None, tile_size: int | None, coords_dir: Path | None) -> FeatureBag:
    """Level-0 pixel coordinates, level-0 tile size, encoder identity and provenance for one file."""
    attrs: dict[str, Any] = dict(raw.attrs) if raw.kind == "histomil" else {}
    attrs.update(source_file=str(path), source_format=raw.kind, source_tool=SOURCE_TOOLS[raw.kind],
                 stored_dtype=raw.stored_dtype)
    version = raw.attrs.get("histomil_version") if raw.kind == "histomil" else raw.attrs.get("stamp_version")
    if version is not None:
        attrs["source_version"] = str(version)
    encoder = raw.attrs.get("extractor") if raw.kind == "stamp" else raw.attrs.get("encoder")
    if encoder and str(encoder) != "unknown":
        attrs["encoder"] = str(encoder)
        attrs["encoder_canonical"] = canonical_encoder(encoder)
    if raw.kind == "pt":
        attrs["source_tool"] = raw.attrs["source_tool"]
        if "encoder_source" in raw.attrs:
            attrs["encoder_source"] = raw.attrs["encoder_source"]
    if raw.kind != "histomil" and "name" in raw.coord_attrs:
        attrs["slide_name"] = str(raw.coord_attrs["name"])
    for k in _GEOMETRY_KEYS:
        if k in raw.coord_attrs:
            attrs.setdefault(k, raw.coord_attrs[k])
    coords, size = raw.coords, None
    if raw.kind == "stamp":
        coords, size = stamp_geometry(path, raw.attrs, raw.coords, mpp, attrs)
    else:
        size = level0_tile_size(raw.coord_attrs)
        sidecar = find_sidecar(path, raw.kind, raw.features, raw.coords, raw.coord_attrs, coords_dir)
        if sidecar is not None:
            side_coords, side_attrs, side_path = sidecar
            if coords is None:
                coords = side_coords
                attrs["coords_source"] = str(side_path)
            side_size = level0_tile_size(side_attrs)
            if size is None and side_size is not None:
                size = side_size
                attrs["tile_size_source"] = str(side_path)
        elif coords is None:
            attrs["coords_missing"] = (
                f"{raw.kind} files store no coordinates; pass the folder of their CLAM/TRIDENT patches files (--coords)"
            )
    size = agree_tile_size(path, size, tile_size)
    if size is not None:
        attrs["patch_size_level0"] = size
    elif coords is not None and "tile_size_missing" not in attrs:
        attrs["tile_size_missing"] = (
            "the file records no tile size; pass --tile-size-level0 or the CLAM patches folder (--coords)"
        )
    if coords is not None:
        coords = np.rint(np.asarray(coords, dtype=np.float64)).astype(np.int64)
    names = raw.tile_paths
    if names is None:
        names = [f"{x}_{y}" for x, y in coords.tolist()] if coords is not None else [str(i) for i in range(len(raw.features))]
    return FeatureBag(bag_id=path.stem, features=raw.features, tile_paths=names, label=raw.label, coords=coords, attrs=attrs,
                      target=raw.target)


# ------------------------------------------------------------------------------------ folders


def feature_files_any(folder: str | Path) -> list[Path]:
    """Feature files of a folder, one per case (file stem); ``.h5`` preferred over ``.pt`` of the same case.

    CLAM's output folder (``h5_files/`` + ``pt_files/``) can be given directly: its ``h5_files``
    (which keep the coordinates) are used, or ``pt_files`` when there are no h5 files. A folder that
    shards are still writing is refused (:func:`histomil.features.shards.check_complete`).
    """
    from histomil.files import natural_key

    folder = Path(folder)
    if not folder.is_dir():
        raise HistomilError(f"{folder}: feature folder does not exist")
    check_complete(folder)  # shards of a sharded extraction still missing: never read as a smaller cohort
    for sub in ("h5_files", "pt_files"):
        if (
            not any(_is_feature_file(p) for p in folder.iterdir())
            and (folder / sub).is_dir()
            and any(_is_feature_file(p) for p in (folder / sub).iterdir())
        ):
            folder = folder / sub
            break
    by_case: dict[str, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: (p.suffix.lower() in (".pt", ".pth"), p.name)):
        if _is_feature_file(p):
            by_case.setdefault(p.stem, p)
    if not by_case:
        raise HistomilError(f"{folder}: no feature files ({', '.join(FEATURE_SUFFIXES)})")
    return [by_case[k] for k in sorted(by_case, key=natural_key)]


def _is_feature_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FEATURE_SUFFIXES


def is_feature_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds feature files (directly or as CLAM's ``h5_files``/``pt_files``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(_is_feature_file(p) for d in (folder, folder / "h5_files", folder / "pt_files") if d.is_dir()
               for p in d.iterdir())


def load_features_folder(
    folder: str | Path,
    labels_csv: str | Path | None = None,
    require_labels: bool = True,
    mpp: float | Mapping[str, float] | None = None,
    *,
    tile_size: int | None = None,
    coords_dir: str | Path | None = None,
    read: Callable[..., FeatureBag] | None = None,
) -> list[FeatureBag]:
    """Every feature file of ``folder`` (any supported layout) as a bag labelled from ``case,y_true``.

    The case of a file is its stem. Labels come from ``labels_csv`` (default ``labels.csv`` or
    ``df.csv`` in the folder, or beside CLAM's ``h5_files``/``pt_files``); a histomil file keeps the
    label it stores, which must agree with the CSV. Every case of the CSV must have a file; with
    ``require_labels`` every file must have a label. All bags must have the same feature dimension and
    encoder. ``mpp`` (one value or case -> value), ``tile_size`` and ``coords_dir``: see
    :func:`load_any_features`. ``read``: how one file becomes a bag (default :func:`load_any_features`;
    :func:`histomil.features.lazy.scan_feature_bag` keeps the features in the file).
    """
    from histomil.data.bags import LABEL_FILES, read_labels_csv

    read = read or load_any_features

    folder = Path(folder)
    files = feature_files_any(folder)
    places = (folder, files[0].parent)
    csv_path = Path(labels_csv) if labels_csv is not None else next(
        (d / n for d in places for n in LABEL_FILES if (d / n).is_file()), None
    )
    labels = read_labels_csv(csv_path) if csv_path is not None else {}
    stems = {p.stem for p in files}
    missing = sorted(c for c in labels if c not in stems)
    if missing:
        few = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise HistomilError(f"{csv_path}: {len(missing)} case(s) have no feature file in {files[0].parent}: {few}")
    bags = []
    for p in files:
        case_mpp = mpp.get(p.stem) if isinstance(mpp, Mapping) else mpp
        bag = read(p, mpp=case_mpp, tile_size=tile_size, coords_dir=coords_dir)
        if p.stem in labels:
            if bag.label is not None and bag.label != labels[p.stem]:
                raise HistomilError(f"{p}: stores label {bag.label}, {csv_path} says {labels[p.stem]}; "
                                    "re-extract the features or correct the CSV")
            bag.label = labels[p.stem]
        bag.bag_id = p.stem
        bags.append(bag)
    if require_labels:
        unlabelled = [b.bag_id for b in bags if b.label is None]
        if unlabelled:
            where = csv_path if csv_path is not None else f"{folder} (no labels.csv; pass a labels CSV with case,y_true)"
            few = ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
            raise HistomilError(f"{where}: {len(unlabelled)} feature file(s) have no label: {few}")
    _check_consistent(bags)
    return bags


def load_feature_dataset(folder: str | Path, require_labels: bool = False, **options: Any) -> list[FeatureBag]:
    """:func:`load_features_folder` with labels optional by default (the feature-dataset reader of the
    pipeline, cross-validation and comparisons; ``options`` as there)."""
    return load_features_folder(folder, require_labels=require_labels, **options)


def _check_consistent(bags: list[FeatureBag]) -> None:
    """One feature dimension and one encoder (canonical name) across a folder; the odd file is named."""
    first = bags[0]
    odd = next((b for b in bags if b.shape[1] != first.shape[1]), None)
    if odd is not None:
        raise HistomilError(
            f"{odd.attrs['source_file']}: {odd.shape[1]}-d features, but {first.attrs['source_file']} has "
            f"{first.shape[1]}-d; features from different encoders cannot be mixed"
        )
    named = [b for b in bags if b.attrs.get("encoder_canonical")]
    odd = next((b for b in named if b.attrs["encoder_canonical"] != named[0].attrs["encoder_canonical"]), None)
    if odd is not None:
        raise HistomilError(
            f"{odd.attrs['source_file']}: features of encoder {odd.attrs['encoder']!r}, but {named[0].attrs['source_file']} "
            f"has {named[0].attrs['encoder']!r}; files from different encoders cannot be mixed"
        )

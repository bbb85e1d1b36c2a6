"""Read tile-feature files written by other tools as :class:`FeatureBag` objects.

So features extracted once with CLAM, TRIDENT or STAMP (often with large foundation-model encoders)
can be trained on and evaluated with histomil without re-extraction. Recognised layouts:

* ``histomil``: our own per-bag HDF5 (``features``, ``tile_paths``, file attributes; see
  :mod:`histomil.features.store`). Slide feature files from :mod:`histomil.slides.features` are of
  this kind and also carry the CLAM/TRIDENT ``coords`` attributes.
* ``clam``: CLAM ``h5_files/<slide>.h5`` with datasets ``features`` (N, D) and ``coords`` (N, 2),
  level-0 top-left pixels; ``coords`` attributes ``patch_size`` / ``patch_level`` when present.
* ``trident``: TRIDENT ``features_<encoder>/<slide>.h5``: the same two datasets, recognised by the
  TRIDENT attributes on ``coords`` (``patch_size_level0``, ``level0_magnification``, ...).
* ``stamp``: STAMP ``<slide>.h5`` with ``feats`` (N, D, often float16) and ``coords`` (N, 2) in
  **micrometres** (file attribute ``unit``: ``"um"``, the default, or ``"px"``) and attributes
  ``extractor``, ``tile_size_um``, ``tile_size_px``. Micrometres become level-0 pixels only when the
  slide resolution is given (``mpp``); without it the bag keeps no coordinates rather than wrong ones.
* ``pt``: CLAM/TRIDENT ``pt_files/<slide>.pt``: a tensor (N, D) saved with ``torch.save`` (no
  coordinates). A numpy array or a dict with a ``features``/``feats`` tensor is accepted too.

``FeatureBag.coords`` is always level-0 pixels (top-left) or None. Attributes that locate the tiles
(``patch_size_level0``, ``patch_size``, ``patch_level``, ``tile_size_um``) are copied into
``FeatureBag.attrs`` so heatmaps can size the tiles; ``attrs["source_format"]`` names the layout.
Anything else is refused with one line that names the file and the keys it has.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag, read_feature_bag

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth")
FORMATS = ("histomil", "clam", "trident", "stamp", "pt")
#: ``coords`` attributes that only TRIDENT writes (CLAM writes patch_size/patch_level/downsample...).
_TRIDENT_KEYS = {"patch_size_level0", "level0_magnification", "target_magnification", "savetodir"}
#: attributes worth keeping on the bag: they tell how large a tile is on the slide.
_GEOMETRY_KEYS = ("patch_size_level0", "patch_size", "patch_level", "tile_size", "level0_magnification",
                  "target_magnification", "tile_size_um", "tile_size_px")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _describe(f: h5py.File) -> str:
    """'datasets a (3, 4), b (3,); attributes x, y' for error messages."""
    items = []
    f.visititems(lambda name, obj: items.append(f"{name} {tuple(obj.shape)}") if isinstance(obj, h5py.Dataset) else None)
    keys = ", ".join(items) or "none"
    attrs = ", ".join(sorted(f.attrs.keys())) or "none"
    return f"datasets: {keys}; attributes: {attrs}"


def _feature_matrix(path: Path, raw: Any, key: str) -> np.ndarray:
    """A finite float32 (N, D) matrix from what a file stores (leading singleton axes squeezed)."""
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
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise HistomilError(f"{path}: '{key}' has NaN or infinite values in {bad} of {out.shape[0]} tiles")
    return out


def _coords_matrix(path: Path, raw: Any, n: int) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] != n:
        raise HistomilError(f"{path}: 'coords' has shape {arr.shape}; expected ({n}, 2), one (x, y) per feature row")
    arr = arr[:, :2]
    if not np.isfinite(arr.astype(np.float64)).all():
        raise HistomilError(f"{path}: 'coords' has NaN or infinite values")
    return arr


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
        raise HistomilError(f"{path}: not a readable HDF5 feature file ({str(exc).splitlines()[0]})") from None


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


def load_any_features(path: str | Path, mpp: float | None = None, label: int | None = None) -> FeatureBag:
    """Read one feature file of any supported layout (detected from its content) as a bag.

    Args:
        path: ``.h5``/``.hdf5`` (histomil, CLAM, TRIDENT, STAMP) or ``.pt``/``.pth`` (a tensor N x D).
        mpp: level-0 micrometres per pixel of the slide; turns STAMP's micrometre coordinates
            into level-0 pixels (without it a STAMP bag has no coordinates).
        label: the bag label, overriding one stored in the file (histomil files store theirs).
    """
    path = Path(path)
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise HistomilError(f"{path}: the slide resolution must be a positive number of micrometres per pixel, got {mpp!r}")
    if path.suffix.lower() in (".pt", ".pth"):
        bag = _read_pt(path)
    else:
        with _open_h5(path) as f:
            kind = _detect_h5(path, f)
        bag = read_feature_bag(path) if kind == "histomil" else _read_h5(path, kind, mpp)
        bag.attrs.setdefault("source_format", kind)
        if kind == "histomil":
            bag.features = _feature_matrix(path, bag.features, "features")
    if label is not None:
        bag.label = int(label)
    return bag


def _read_h5(path: Path, kind: str, mpp: float | None) -> FeatureBag:
    key = "feats" if kind == "stamp" else "features"
    try:
        with h5py.File(path, "r") as f:
            feats = _feature_matrix(path, f[key][()], key)
            attrs: dict[str, Any] = {"source_format": kind}
            feat_attrs = {k: _plain(v) for k, v in f[key].attrs.items()}
            file_attrs = {k: _plain(v) for k, v in f.attrs.items()}
            coords = None
            coord_attrs: dict[str, Any] = {}
            if "coords" in f:
                coords = _coords_matrix(path, f["coords"][()], feats.shape[0])
                coord_attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
    except OSError as exc:
        raise HistomilError(f"{path}: cannot read feature file ({str(exc).splitlines()[0]})") from None
    if kind == "stamp":
        encoder = file_attrs.get("extractor")
        if str(file_attrs.get("feat_type", "tile")) != "tile":
            raise HistomilError(f"{path}: STAMP features of type {file_attrs['feat_type']!r}, not per-tile features")
        for k in ("tile_size_um", "tile_size_px", "tile_size", "stamp_version"):
            if k in file_attrs:
                attrs[k] = file_attrs[k]
        if "tile_size" in attrs and "tile_size_um" not in attrs:  # STAMP before 2.1 called it tile_size
            attrs["tile_size_um"] = attrs.pop("tile_size")
        if coords is not None:
            unit = str(file_attrs.get("unit", "um")).lower()
            if unit in ("um", "micron", "microns", "µm"):
                if mpp is None:
                    coords = None  # micrometres cannot become pixels without the slide resolution
                    attrs["coords_dropped"] = "STAMP coordinates are in micrometres; pass the slide mpp to keep them"
                else:
                    coords = coords.astype(np.float64) / float(mpp)
                    if "tile_size_um" in attrs:
                        attrs["patch_size_level0"] = round(float(attrs["tile_size_um"]) / float(mpp))
            elif unit not in ("px", "pixel", "pixels"):
                raise HistomilError(f"{path}: STAMP coordinate unit {unit!r} is unknown (expected 'um' or 'px')")
    else:
        encoder = feat_attrs.get("encoder") or file_attrs.get("encoder")
        for k in _GEOMETRY_KEYS:
            if k in coord_attrs:
                attrs[k] = coord_attrs[k]
        if "name" in coord_attrs:
            attrs["slide_name"] = str(coord_attrs["name"])
    if encoder:
        attrs["encoder"] = str(encoder)
    if coords is not None:
        coords = np.rint(coords).astype(np.int64)
    names = [f"{int(x)}_{int(y)}" for x, y in coords] if coords is not None else [str(i) for i in range(feats.shape[0])]
    return FeatureBag(bag_id=path.stem, features=feats, tile_paths=names, label=None, coords=coords, attrs=attrs)


def _torch_load(path: Path) -> Any:
    """``torch.load`` without arbitrary unpickling; numpy arrays (TRIDENT may save one) allowed."""
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HistomilError(f"{path}: not a readable torch feature file ({first[:200]})") from None


def _read_pt(path: Path) -> FeatureBag:
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
        raw = data[key]
        if "coords" in data:
            coords = data["coords"]
    else:
        key, raw = "tensor", data
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().float().cpu().numpy()
    if not isinstance(raw, np.ndarray):
        raise HistomilError(f"{path}: holds a {type(raw).__name__}, not a feature tensor (tiles x feature dim)")
    feats = _feature_matrix(path, raw, key)
    if coords is not None:
        if isinstance(coords, torch.Tensor):
            coords = coords.cpu().numpy()
        coords = np.rint(_coords_matrix(path, coords, feats.shape[0]).astype(np.float64)).astype(np.int64)
    names = [f"{int(x)}_{int(y)}" for x, y in coords] if coords is not None else [str(i) for i in range(feats.shape[0])]
    return FeatureBag(bag_id=path.stem, features=feats, tile_paths=names, coords=coords, attrs={"source_format": "pt"})


def feature_files_any(folder: str | Path) -> list[Path]:
    """Feature files of a folder, one per case (file stem); ``.h5`` preferred over ``.pt`` of the same case.

    CLAM's output folder (``h5_files/`` + ``pt_files/``) can be given directly: its ``h5_files``
    (which keep the coordinates) are used, or ``pt_files`` when there are no h5 files.
    """
    from histomil.data.bags import natural_key

    folder = Path(folder)
    if not folder.is_dir():
        raise HistomilError(f"{folder}: feature folder does not exist")
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


def load_features_folder(
    folder: str | Path,
    labels_csv: str | Path | None = None,
    require_labels: bool = True,
    mpp: float | Mapping[str, float] | None = None,
) -> list[FeatureBag]:
    """Every feature file of ``folder`` (any supported layout) as a bag labelled from ``case,y_true``.

    The case of a file is its stem. Labels come from ``labels_csv`` (default ``folder/labels.csv``
    or ``folder/df.csv``); a histomil file without a CSV row keeps its stored label. Every case of
    the CSV must have a file; with ``require_labels`` every file must have a label. All bags must
    have the same feature dimension. ``mpp`` (one value or case -> value) converts STAMP coordinates.
    """
    from histomil.data.bags import LABEL_FILES, read_labels_csv

    folder = Path(folder)
    files = feature_files_any(folder)
    csv_path = Path(labels_csv) if labels_csv is not None else next(
        (folder / n for n in LABEL_FILES if (folder / n).is_file()), None
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
        bag = load_any_features(p, mpp=case_mpp, label=labels.get(p.stem))
        bag.bag_id = p.stem
        bags.append(bag)
    if require_labels:
        unlabelled = [b.bag_id for b in bags if b.label is None]
        if unlabelled:
            where = csv_path if csv_path is not None else f"{folder} (no labels.csv; pass a labels CSV with case,y_true)"
            few = ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
            raise HistomilError(f"{where}: {len(unlabelled)} feature file(s) have no label: {few}")
    dims = {b.features.shape[1] for b in bags}
    if len(dims) > 1:
        first = bags[0]
        odd = next(b for b in bags if b.features.shape[1] != first.features.shape[1])
        raise HistomilError(
            f"{files[0].parent}: feature dimensions differ ({first.bag_id}: {first.features.shape[1]}, "
            f"{odd.bag_id}: {odd.features.shape[1]}); features from different encoders cannot be mixed"
        )
    encoders = {str(b.attrs.get("encoder")) for b in bags if b.attrs.get("encoder")}
    if len(encoders) > 1:
        raise HistomilError(f"{files[0].parent}: files from different encoders ({', '.join(sorted(encoders))}) cannot be mixed")
    return bags


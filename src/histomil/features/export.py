"""Write histomil slide feature files in the layouts CLAM, TRIDENT and STAMP read, with their meanings.

Each layout is what the tool itself writes (checked against files the tools wrote, ``../shared/interop``):

* ``clam`` (into ``OUT/``): ``h5_files/<slide>.h5`` with ``features`` float32 (N, D) and ``coords``
  int32 (N, 2), no attributes, as CLAM's ``save_hdf5``; ``pt_files/<slide>.pt``, the features as a
  float32 torch tensor (what CLAM's training loads); ``patches/<slide>.h5`` with ``coords`` int64 and
  CLAM's attributes ``patch_size`` (pixels read **at** ``patch_level``), ``patch_level``,
  ``downsample`` (level-0 / level size, per axis), ``downsampled_level_dim``, ``level_dim``, ``name``,
  ``save_path``. CLAM cannot say "449 level-0 pixels at level 1": its extent is ``patch_size x
  downsample``, within half a level pixel of histomil's.
* ``trident`` (into ``OUT/``): ``patches/<slide>_patches.h5`` and ``features_<encoder>/<slide>.h5``
  (``features`` with attributes ``encoder``, ``name``, ``savetodir``); ``coords`` int64 with
  TRIDENT's attributes ``patch_size`` (tile side **at the target magnification**: the pixels the
  encoder saw), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``
  (target pixels), ``level0_width``, ``level0_height``, ``name``, ``savetodir``. TRIDENT computes with
  the magnifications, so a slide without objective power is refused (or given ``slide_magnification``).
* ``stamp`` (into ``OUT/``): ``<slide>.h5`` as STAMP 2.5: ``feats`` float16, ``coords`` float32
  top-left **micrometres**, file attributes ``stamp_version`` ("2.5.0", the layout written),
  ``extractor`` (the encoder), ``unit`` ``"um"``, ``tile_size_um``, ``tile_size_px`` (the pixels the
  encoder saw), ``feat_type`` ``"tile"``. Without the slide's um/px this is refused (or given
  ``slide_mpp``). STAMP's ``code_hash`` (a hash of STAMP's own code) is not written.

No attribute is ever NaN: a fact the slide does not record is refused in one line naming the file
and the option that supplies it. Every file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histomil.errors import HistomilError
from histomil.features.formats import feature_files_any, load_any_features
from histomil.features.geometry import read_coords_file
from histomil.features.store import FeatureBag
from histomil.files import atomic_write

EXPORT_LAYOUTS = ("clam", "trident", "stamp")
#: The STAMP release whose feature-file layout :func:`write_stamp` writes (its readers refuse newer ones).
STAMP_LAYOUT_VERSION = "2.5.0"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class SlideTiling:
    """How one slide's tiles were cut, as a histomil slide feature file records it (level-0 terms)."""

    name: str  # slide stem
    coords: np.ndarray  # (N, 2) int64, level-0 top-left
    patch_size_level0: int  # tile side on the slide, level-0 pixels
    tile_size: int  # tile side the encoder saw (pixels at the target resolution)
    patch_level: int  # pyramid level read
    read_size: int  # pixels read at patch_level
    level_dim: tuple[int, int]  # (width, height) of patch_level
    level0_dim: tuple[int, int]
    stride_level0: int
    slide_mpp: float | None  # level-0 um/px
    objective_power: float | None  # level-0 magnification


def _positive(value: Any) -> float | None:
    try:
        v = float(np.ravel(value)[0]) if value is not None else None
    except (TypeError, ValueError, IndexError):
        return None
    return v if v is not None and math.isfinite(v) and v > 0 else None


def _settle(path: Path, what: str, recorded: float | None, given: float | None, option: str) -> float | None:
    """The recorded fact, else the given one; a given value contradicting the file is refused."""
    if given is None:
        return recorded
    if recorded is not None and abs(recorded - given) > 1e-3 * recorded:
        raise HistomilError(f"{path}: records {what} {recorded:g}, {option} says {given:g}")
    return recorded if recorded is not None else float(given)


def read_slide_features(
    path: str | Path, slide_mpp: float | None = None, slide_magnification: float | None = None
) -> tuple[FeatureBag, SlideTiling]:
    """A histomil slide feature file (``histomil features slides``) as a bag and its tiling.

    ``slide_mpp`` / ``slide_magnification`` supply what the slide's header lacked; they must agree
    with a value the file records.
    """
    path = Path(path)
    bag = load_any_features(path)
    if bag.attrs.get("source_format") != "histomil" or bag.coords is None:
        raise HistomilError(f"{path}: not a histomil slide feature file (export converts files of "
                            f"'histomil features slides'; this one is {bag.attrs.get('source_format')})")
    _, a = read_coords_file(path)
    need = ("patch_size_level0", "tile_size", "patch_level", "patch_size", "level_dim", "level0_dim")
    missing = [k for k in need if k not in a]
    if missing:
        raise HistomilError(f"{path}: 'coords' lacks {', '.join(missing)}; re-extract with 'histomil features slides'")
    tiling = SlideTiling(
        name=str(a.get("name", path.stem)),
        coords=np.asarray(bag.coords, np.int64),
        patch_size_level0=int(a["patch_size_level0"]),
        tile_size=int(a["tile_size"]),
        patch_level=int(a["patch_level"]),
        read_size=int(a["patch_size"]),
        level_dim=(int(a["level_dim"][0]), int(a["level_dim"][1])),
        level0_dim=(int(a["level0_dim"][0]), int(a["level0_dim"][1])),
        stride_level0=int(a.get("stride_level0", a["patch_size_level0"])),
        slide_mpp=_settle(path, "a slide resolution of", _positive(a.get("slide_mpp")), slide_mpp, "--slide-mpp"),
        objective_power=_settle(path, "an objective power of", _positive(a.get("level0_magnification")),
                                slide_magnification, "--slide-magnification"),
    )
    return bag, tiling


def _encoder_name(path: Path, bag: FeatureBag) -> str:
    name = bag.attrs.get("encoder")
    if not name:
        raise HistomilError(f"{path}: records no encoder name")
    return str(name)


def _number(v: float) -> int | float:
    """An integral magnification as an int (as TRIDENT writes them), any other as a float."""
    return int(round(v)) if abs(v - round(v)) < 1e-6 else float(v)


def _write_h5(final: Path, fill: Callable[[h5py.File], None]) -> Path:
    with atomic_write(final) as tmp, h5py.File(tmp, "w") as f:
        fill(f)
    return final


def write_clam(out: str | Path, bag: FeatureBag, t: SlideTiling, source: Path | None = None) -> list[Path]:
    """CLAM's ``h5_files/``, ``pt_files/`` and ``patches/`` for one slide (module docstring; CLAM records
    no encoder, so ``source`` is not needed for messages)."""
    import torch

    out = Path(out)
    feats = np.asarray(bag.features, np.float32)
    n = len(feats)

    def h5_file(f: h5py.File) -> None:
        f.create_dataset("features", data=feats, chunks=(min(n, 32), feats.shape[1]), maxshape=(None, feats.shape[1]))
        f.create_dataset("coords", data=t.coords.astype(np.int32), chunks=(min(n, 32), 2), maxshape=(None, 2))

    def patches(f: h5py.File) -> None:
        ds = f.create_dataset("coords", data=t.coords.astype(np.int64), chunks=(1, 2), maxshape=(None, 2))
        level_dim = np.asarray(t.level_dim, np.int64)
        ds.attrs["patch_size"] = np.int64(t.read_size)
        ds.attrs["patch_level"] = np.int64(t.patch_level)
        ds.attrs["downsample"] = np.asarray(t.level0_dim, np.float64) / level_dim
        ds.attrs["downsampled_level_dim"] = level_dim
        ds.attrs["level_dim"] = level_dim
        ds.attrs["name"] = t.name
        ds.attrs["save_path"] = str(out / "patches")

    written = [_write_h5(out / "h5_files" / f"{t.name}.h5", h5_file)]
    pt = out / "pt_files" / f"{t.name}.pt"
    with atomic_write(pt) as tmp:
        torch.save(torch.from_numpy(feats.copy()), tmp)
    written.append(pt)
    written.append(_write_h5(out / "patches" / f"{t.name}.h5", patches))
    return written


def trident_coords_attrs(path: Path, t: SlideTiling, savetodir: Path) -> dict[str, Any]:
    """TRIDENT's ``coords`` attributes for this tiling (``patch_size`` at the target magnification)."""
    if t.objective_power is None:
        raise HistomilError(f"{path}: the slide records no objective power, which TRIDENT's files need; "
                            "pass --slide-magnification")
    target = t.objective_power * t.tile_size / t.patch_size_level0
    stride_target = t.stride_level0 * t.tile_size / t.patch_size_level0
    return {
        "patch_size": np.int64(t.tile_size),
        "patch_size_level0": np.int64(t.patch_size_level0),
        "level0_magnification": _number(t.objective_power),
        "target_magnification": _number(target),
        "overlap": np.int64(max(0, round(t.tile_size - stride_target))),
        "level0_width": np.int64(t.level0_dim[0]),
        "level0_height": np.int64(t.level0_dim[1]),
        "name": t.name,
        "savetodir": str(savetodir),
    }


def write_trident(out: str | Path, bag: FeatureBag, t: SlideTiling, source: Path | None = None) -> list[Path]:
    """TRIDENT's ``patches/<slide>_patches.h5`` and ``features_<encoder>/<slide>.h5`` (module docstring)."""
    out = Path(out)
    source = source or out
    encoder = _encoder_name(source, bag)
    attrs = trident_coords_attrs(source, t, out)
    feat_dir = out / f"features_{encoder}"

    def coords(f: h5py.File) -> None:
        ds = f.create_dataset("coords", data=t.coords.astype(np.int64))
        ds.attrs.update(attrs)

    def features(f: h5py.File) -> None:
        ds = f.create_dataset("features", data=np.asarray(bag.features, np.float32))
        ds.attrs.update({"encoder": encoder, "name": t.name, "savetodir": str(feat_dir)})
        coords(f)

    return [_write_h5(out / "patches" / f"{t.name}_patches.h5", coords), _write_h5(feat_dir / f"{t.name}.h5", features)]


def write_stamp(out: str | Path, bag: FeatureBag, t: SlideTiling, source: Path | None = None) -> list[Path]:
    """STAMP's ``<slide>.h5``: float16 ``feats``, micrometre ``coords`` (module docstring)."""
    out = Path(out)
    source = source or out
    encoder = _encoder_name(source, bag)
    if t.slide_mpp is None:
        raise HistomilError(f"{source}: the slide records no micrometres per pixel, which STAMP's coordinates need; "
                            "pass --slide-mpp")
    feats = np.asarray(bag.features, np.float32)
    if np.abs(feats).max() > _FLOAT16_MAX:
        raise HistomilError(f"{source}: features reach {np.abs(feats).max():g}, beyond float16 (STAMP stores float16)")

    def fill(f: h5py.File) -> None:
        f.create_dataset("feats", data=feats.astype(np.float16))
        f.create_dataset("coords", data=(t.coords.astype(np.float64) * t.slide_mpp).astype(np.float32))
        f.attrs["stamp_version"] = STAMP_LAYOUT_VERSION
        f.attrs["extractor"] = encoder
        f.attrs["unit"] = "um"
        f.attrs["tile_size_um"] = float(t.patch_size_level0 * t.slide_mpp)
        f.attrs["tile_size_px"] = np.int64(t.tile_size)
        f.attrs["feat_type"] = "tile"

    return [_write_h5(out / f"{t.name}.h5", fill)]


WRITERS = {"clam": write_clam, "trident": write_trident, "stamp": write_stamp}


def export_slide_features(
    path: str | Path, out: str | Path, layout: str, *, slide_mpp: float | None = None,
    slide_magnification: float | None = None,
) -> list[Path]:
    """Write one histomil slide feature file in ``layout`` under ``out``; returns the files written."""
    if layout not in WRITERS:
        raise HistomilError(f"layout must be one of {', '.join(EXPORT_LAYOUTS)}, not {layout!r}")
    path = Path(path)
    bag, tiling = read_slide_features(path, slide_mpp, slide_magnification)
    return WRITERS[layout](out, bag, tiling, path)


def export_features(
    sources: Sequence[str | Path], out: str | Path, layout: str, *, slide_mpp: float | None = None,
    slide_magnification: float | None = None, log: Callable[[str], None] | None = None,
) -> list[Path]:
    """:func:`export_slide_features` for feature files and folders of them; returns every file written."""
    if layout not in WRITERS:
        raise HistomilError(f"layout must be one of {', '.join(EXPORT_LAYOUTS)}, not {layout!r}")
    files: list[Path] = []
    for s in (Path(p) for p in sources):
        files.extend(feature_files_any(s) if s.is_dir() else [s])
    if Path(out).resolve() in {f.parent.resolve() for f in files} and layout == "stamp":
        raise HistomilError(f"{out}: holds the source files; STAMP files of the same names would replace them")
    written: list[Path] = []
    for f in files:
        done = export_slide_features(f, out, layout, slide_mpp=slide_mpp, slide_magnification=slide_magnification)
        written.extend(done)
        if log:
            log(f"{f.name}: {layout} -> {', '.join(str(p) for p in done)}")
    return written

"""Tile features straight from whole-slide images: one HDF5 file per slide, no JPEG round trip.

Tiles are read from the slide at their planned coordinates (:func:`~histomil.slides.tiling.read_tile`)
in a DataLoader worker that opens its own OpenSlide handle, while the main process encodes the
previous batch; features are written into the output file batch by batch, so memory stays flat
whatever the slide size.

Layout of ``<out>/<slide stem>.h5`` (histomil's own, self-describing; its ``features`` and ``coords``
are where CLAM puts them, and :func:`~histomil.features.store.read_feature_bag` reads it):

* ``features`` (N, D) float32; attributes ``encoder`` (encoder name) and ``name`` (slide stem, as TRIDENT).
* ``coords`` (N, 2) int64, level-0 top-left (x, y); attributes ``patch_size`` and ``patch_level``
  (CLAM: ``read_region(coord, patch_level, (patch_size, patch_size))`` gives the tile before it is
  resized to ``tile_size``), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap``, ``level0_width``, ``level0_height`` (TRIDENT), plus ``tile_size``, ``target_mpp``,
  ``slide_mpp`` and the rest of :func:`~histomil.slides.tiling.write_plan`'s attributes. ``patch_size``
  has CLAM's meaning (pixels read at ``patch_level``), not TRIDENT's (pixels at the target
  magnification): for TRIDENT, CLAM or STAMP files use :mod:`histomil.features.export`. A fact the
  slide does not record (objective power, um/px) is left out, never written as NaN.
* ``tile_paths`` (N,) strings ``"<x>_<y>"``; ``tissue_fraction`` (N,) float32.
* file attributes: ``bag_id`` (slide stem), ``label`` (-1), the encoder description (``encoder``,
  ``input_size``, ``mean``, ``std``, ``dim``, ``precision``), ``feature_dim``, ``tiling`` (the
  tiling spec as JSON, or the coordinates file it came from), ``slide_path``, ``histomil_version``.

The file is written under a temporary name and renamed when complete, so an interrupted run leaves
no partial file, and a re-run skips every slide whose file exists with the same encoder and tiling.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch

from histomil import __version__
from histomil.callbacks import Log, Progress
from histomil.errors import HistomilError
from histomil.files import atomic_write
from histomil.slides.reader import Slide, open_slide
from histomil.slides.tiling import TilePlan, TilingSpec, plan_tiles, read_tile

#: File name endings OpenSlide reads (DICOM folders aside); used to find slides in a folder.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")


# ------------------------------------------------------------------------------- finding slides


def is_slide_file(path: str | Path) -> bool:
    """True for an existing file whose name ends like a whole-slide image."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SLIDE_EXTENSIONS and not path.name.startswith(".")


def is_slide_source(path: str | Path) -> bool:
    """True when ``path`` is a slide file or a folder that directly holds slide files (not tile folders)."""
    path = Path(path)
    if path.is_dir():
        return any(is_slide_file(p) for p in path.iterdir())
    return is_slide_file(path)


def find_slides(paths: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders (a folder's slide files, not recursive), in a stable order.

    Two slides with the same stem would write the same output file, so they are refused.
    """
    from histomil.files import natural_key

    out: list[Path] = []
    for p in (Path(p) for p in paths):
        if p.is_dir():
            found = sorted((q for q in p.iterdir() if is_slide_file(q)), key=lambda q: natural_key(q.name))
            if not found:
                raise HistomilError(f"{p}: no slide files in this folder ({' '.join(SLIDE_EXTENSIONS)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise HistomilError(f"{p}: no such slide file")
    if not out:
        raise HistomilError("no slides given")
    stems: dict[str, Path] = {}
    for p in out:
        if p.stem in stems and stems[p.stem].resolve() != p.resolve():
            raise HistomilError(f"{p}: has the same name as {stems[p.stem]}; their outputs would overwrite each other")
        stems[p.stem] = p
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------ plans from coords files

#: How tilers name the coordinates file of slide ``<stem>``: histomil and CLAM ``<stem>.h5``,
#: TRIDENT ``<stem>_patches.h5``.
COORDS_NAMES = ("{stem}.h5", "{stem}_patches.h5")


def find_coords_file(coords_dir: str | Path, stem: str) -> Path:
    """The coordinates file of slide ``stem`` in ``coords_dir`` (any name of :data:`COORDS_NAMES`)."""
    folder = Path(coords_dir)
    if not folder.is_dir():
        raise HistomilError(f"{folder}: coordinates folder does not exist")
    names = [n.format(stem=stem) for n in COORDS_NAMES]
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        raise HistomilError(f"{folder}: no coordinates file for slide {stem} (looked for {' or '.join(names)})")
    return found


def plan_from_coords(slide: Slide, coords_h5: str | Path) -> TilePlan:
    """A tile plan from a coordinates file: histomil's ``histomil tile`` output, CLAM's or TRIDENT's.

    The tile geometry comes from the attributes of ``coords``: ``patch_size_level0`` and
    ``tile_size`` (histomil), ``patch_size`` + ``patch_level`` (CLAM: read that many pixels at that
    level), or ``patch_size_level0`` + ``patch_size`` (TRIDENT: level-0 extent and output size).
    """
    path = Path(coords_h5)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise HistomilError(f"{path}: no 'coords' dataset (datasets: {', '.join(f.keys()) or 'none'})")
            coords = np.asarray(f["coords"][()])
            attrs = {k: v for k, v in f["coords"].attrs.items()}
            frac = np.asarray(f["tissue_fraction"][()], np.float32) if "tissue_fraction" in f else None
    except OSError as exc:
        raise HistomilError(f"{path}: not a readable coordinates file ({str(exc).splitlines()[0]})") from None
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise HistomilError(f"{path}: 'coords' has shape {coords.shape}; expected (N, 2)")

    def num(key: str) -> float | None:
        v = attrs.get(key)
        try:
            v = float(np.asarray(v).ravel()[0]) if v is not None else None
        except (TypeError, ValueError, IndexError):
            return None
        return v if v is not None and math.isfinite(v) and v > 0 else None

    level_attr = attrs.get("patch_level")
    patch = num("patch_size")
    p0 = num("patch_size_level0")
    tile = num("tile_size")
    if level_attr is not None and patch is not None:  # CLAM semantics (histomil writes these too)
        level = int(np.asarray(level_attr).ravel()[0])
        if not 0 <= level < slide.level_count:
            raise HistomilError(f"{path}: patch_level {level} does not exist in {slide.path} ({slide.level_count} levels)")
        read_size = round(patch)
        p0 = p0 or read_size * slide.level_downsamples[level]
        tile = tile or read_size
    elif p0 is not None:  # TRIDENT: level-0 extent; patch_size is the output size
        tile = tile or patch or p0
        level = slide.best_level_for_downsample(p0 / tile)
        read_size = max(1, round(p0 / slide.level_downsamples[level]))
    else:
        raise HistomilError(
            f"{path}: the 'coords' attributes do not give the tile size (need patch_size + patch_level, or "
            f"patch_size_level0; found: {', '.join(sorted(attrs)) or 'none'})"
        )
    n = coords.shape[0]
    return TilePlan(
        slide_path=slide.path,
        coords=coords.astype(np.int64),
        tissue_fraction=frac if frac is not None and frac.shape == (n,) else np.full(n, np.nan, np.float32),
        level=level,
        read_size=read_size,
        tile_size=round(tile),
        downsample=float(p0) / float(tile),
        patch_size_level0=round(p0),
        stride_level0=int(num("stride_level0") or round(p0)),
        target_mpp=None if slide.mpp is None else slide.mpp * float(p0) / float(tile),
        slide_mpp=slide.mpp,
        level0_dims=slide.dimensions,
        n_candidates=n,
        mask=np.zeros((0, 0), bool),
        thumbnail=np.zeros((0, 0, 3), np.uint8),
    )


# ------------------------------------------------------------------------------ the tile reader


class _SlideTileBatches(torch.utils.data.Dataset):
    """Batch ``i`` = the tiles ``coords[i*B:(i+1)*B]`` read from the slide, as (B, S, S, 3) uint8.

    The slide is opened lazily in whichever process reads (one handle per DataLoader worker):
    OpenSlide handles must not cross a fork. A read error comes back as a message, not an exception,
    so the main process can name the slide.
    """

    def __init__(self, slide_path: Path, slide_mpp: float | None, plan: TilePlan, batch_size: int) -> None:
        self.slide_path = slide_path
        self.slide_mpp = slide_mpp
        self.plan = replace(plan, mask=np.zeros((0, 0), bool), thumbnail=np.zeros((0, 0, 3), np.uint8))
        self.batch_size = batch_size
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.plan) / self.batch_size)

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path, mpp=self.slide_mpp)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        coords = self.plan.coords[i * self.batch_size : (i + 1) * self.batch_size]
        try:
            slide = self._handle()
            tiles = np.stack([read_tile(slide, self.plan, c) for c in coords])
        except HistomilError as exc:
            return i, None, str(exc)
        return i, tiles, None

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None


def _as_is(item: Any) -> Any:
    return item  # keep numpy tiles as they are (the default would convert them to tensors)


def iter_tile_batches(
    slide_path: Path, plan: TilePlan, batch_size: int = 64, num_workers: int = 1, slide_mpp: float | None = None
):
    """Yield ``(start row, tiles (B, S, S, 3) uint8)`` for the planned tiles, read in worker processes."""
    ds = _SlideTileBatches(Path(slide_path), slide_mpp, plan, batch_size)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_as_is,
        prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False,
    )
    try:
        for i, tiles, err in loader:
            if err is not None:
                raise HistomilError(err)
            yield i * batch_size, tiles
    finally:
        ds.close()


# ---------------------------------------------------------------------------------- the writer


def _encoder_attrs(encoder: torch.nn.Module) -> dict[str, Any]:
    return encoder.feature_attrs()  # type: ignore[operator]  # TileEncoder or runtimes.RuntimeEncoder


def _coords_attrs(plan: TilePlan, slide: Slide, spec: TilingSpec | None) -> dict[str, Any]:
    """CLAM + TRIDENT attributes of ``coords`` (see the module docstring).

    A fact the slide does not record (objective power, um/px) is left out, never written as NaN:
    readers (TRIDENT among them) take a present attribute as a number to compute with.
    """
    objective = slide.objective_power
    if spec is not None and spec.slide_magnification is not None:
        objective = spec.slide_magnification
    target_mag = objective / plan.downsample if objective is not None else None
    stride_target = plan.stride_level0 / plan.downsample if plan.downsample > 0 else plan.tile_size
    attrs: dict[str, Any] = {
        "patch_size": int(plan.read_size),
        "patch_level": int(plan.level),
        "patch_size_level0": int(plan.patch_size_level0),
        "stride_level0": int(plan.stride_level0),
        "downsample": float(plan.downsample),
        "level_downsample": float(slide.level_downsamples[plan.level]),
        "tile_size": int(plan.tile_size),
        "read_size": int(plan.read_size),
        "level": int(plan.level),
        "level_dim": np.asarray(slide.level_dimensions[plan.level], dtype=np.int64),
        "level0_dim": np.asarray(plan.level0_dims, dtype=np.int64),
        "level_dims": np.asarray(slide.level_dimensions, dtype=np.int64),
        "level0_width": int(plan.level0_dims[0]),
        "level0_height": int(plan.level0_dims[1]),
        "overlap": int(max(0, round(plan.tile_size - stride_target))),
        "name": slide.name,
        "slide_path": str(slide.path),
    }
    optional = {"target_mpp": plan.target_mpp, "slide_mpp": plan.slide_mpp, "level0_magnification": objective,
                "target_magnification": target_mag}
    attrs.update({k: float(v) for k, v in optional.items() if v is not None})
    return attrs


def write_slide_features(
    out_path: str | Path,
    slide: Slide,
    plan: TilePlan,
    encoder: torch.nn.Module,
    *,
    spec: TilingSpec | None = None,
    tiling: str = "",
    batch_size: int = 64,
    num_workers: int = 1,
    progress: Progress | None = None,
) -> Path:
    """Encode every planned tile of ``slide`` and write ``out_path`` atomically (layout: module docstring)."""
    out_path = Path(out_path)
    n = len(plan)
    if n == 0:
        raise HistomilError(
            f"{slide.path}: no tissue tiles to encode (lower --min-tissue, or check the tissue mask preview)"
        )
    info = encoder.info
    with atomic_write(out_path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset(
            "features", shape=(n, info.dim), dtype=np.float32, chunks=(min(n, 256), info.dim)
        )
        ds.attrs["encoder"] = info.name
        ds.attrs["name"] = slide.name
        ds.attrs["savetodir"] = str(out_path.parent)
        done = 0
        for start, tiles in iter_tile_batches(slide.path, plan, batch_size, num_workers, slide_mpp=slide.mpp):
            feats = encoder.encode(tiles, batch_size=batch_size)
            if feats.shape != (len(tiles), info.dim):
                raise HistomilError(f"encoder {info.name}: returned shape {feats.shape} for {len(tiles)} tiles")
            ds[start : start + len(tiles)] = feats
            done += len(tiles)
            if progress:
                progress("encoding tiles", done, n)
        if done != n:  # pragma: no cover - the loader yields every batch or raises
            raise HistomilError(f"{slide.path}: only {done} of {n} tiles were encoded")
        cds = f.create_dataset("coords", data=plan.coords.reshape(-1, 2).astype(np.int64))
        for key, value in _coords_attrs(plan, slide, spec).items():
            cds.attrs[key] = value
        names = np.array([f"{int(x)}_{int(y)}" for x, y in plan.coords], dtype=object)
        f.create_dataset("tile_paths", data=names, dtype=h5py.string_dtype())
        f.create_dataset("tissue_fraction", data=np.asarray(plan.tissue_fraction, np.float32))
        f.attrs["bag_id"] = slide.name
        f.attrs["label"] = -1
        for key, value in _encoder_attrs(encoder).items():
            f.attrs[key] = value
        f.attrs["feature_dim"] = int(info.dim)
        f.attrs["tiling"] = tiling
        f.attrs["slide_name"] = slide.name
        f.attrs["slide_path"] = str(slide.path)
        f.attrs["n_candidates"] = int(plan.n_candidates)
        f.attrs["histomil_version"] = __version__
    return out_path


def existing_complete(path: str | Path, encoder: torch.nn.Module, tiling: str) -> bool:
    """True when ``path`` is a finished slide feature file made with this encoder and tiling."""
    path = Path(path)
    if not path.is_file():
        return False
    want = _encoder_attrs(encoder)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f or "tile_paths" not in f:
                return False
            n = f["features"].shape[0]
            if f["coords"].shape != (n, 2) or f["tile_paths"].shape != (n,) or n == 0:
                return False
            if f["features"].shape[1] != want["dim"]:
                return False
            attrs = f.attrs
            same = all(_same(attrs.get(k), want[k]) for k in ("encoder", "precision", "input_size", "mean", "std"))
            same = same and _same(attrs.get("runtime", "torch"), want.get("runtime", "torch"))  # older files: torch
            # weights identity and preset preprocessing: recorded only when set (absent on both sides for Lite0)
            same = same and all(_same(attrs.get(k), want.get(k)) for k in ("weights", "resize", "interpolation"))
            return same and _same(attrs.get("tiling"), tiling)
    except (OSError, KeyError):
        return False


def _same(stored: Any, wanted: Any) -> bool:
    if isinstance(stored, bytes):
        stored = stored.decode()
    if isinstance(stored, np.ndarray):
        stored = stored.tolist()
    if isinstance(stored, np.generic):
        stored = stored.item()
    if isinstance(wanted, (list, tuple)):
        return isinstance(stored, (list, tuple)) and len(stored) == len(wanted) and all(
            abs(float(a) - float(b)) < 1e-9 for a, b in zip(stored, wanted)
        )
    return stored == wanted


def spec_signature(spec: TilingSpec) -> str:
    """The tiling spec as canonical JSON: a feature file is reused only for the same tiling."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


# ------------------------------------------------------------------------------ many slides


@dataclass
class SlideFeaturesSummary:
    """Outcome of :func:`extract_slide_features`."""

    files: dict[str, Path] = field(default_factory=dict)  # slide stem -> feature file (new or reused)
    written: list[str] = field(default_factory=list)  # stems encoded in this run
    existing: list[str] = field(default_factory=list)  # stems whose complete file was reused
    n_tiles: dict[str, int] = field(default_factory=dict)  # stem -> tiles encoded (written slides)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (slide, reason) for bad slides
    seconds: float = 0.0


def extract_slide_features(
    slides: Sequence[str | Path],
    out_dir: str | Path,
    encoder: torch.nn.Module,
    spec: TilingSpec | None = None,
    *,
    coords_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 1,
    on_bad_slide: Literal["error", "skip"] = "error",
    overwrite: bool = False,
    log: Log | None = None,
    progress: Progress | None = None,
) -> SlideFeaturesSummary:
    """Write ``out_dir/<slide stem>.h5`` for every slide (resumable; see the module docstring).

    Args:
        slides: slide files, or folders of slide files.
        encoder: a :class:`~histomil.features.encoders.TileEncoder` (``encode`` + ``info``).
        spec: how to tile (default :class:`TilingSpec`: 224 px at 0.5 um/px); ignored for slides
            whose coordinates come from ``coords_dir``.
        coords_dir: folder of ``<slide stem>.h5`` coordinate files (``histomil tile``, CLAM or
            TRIDENT patching output) to encode exactly those tiles instead of planning new ones.
        on_bad_slide: ``"error"`` stops at the first unreadable slide; ``"skip"`` lists it and goes on.
        overwrite: re-encode slides whose feature file is already complete.
    """
    import time

    if on_bad_slide not in ("error", "skip"):
        raise HistomilError(f"--on-bad-slide must be 'error' or 'skip', not {on_bad_slide!r}")
    if batch_size < 1 or num_workers < 0:
        raise HistomilError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {num_workers})")
    spec = spec or TilingSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = find_slides(slides)
    summary = SlideFeaturesSummary()
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        out_path = out_dir / f"{path.stem}.h5"
        try:
            coords_file = find_coords_file(coords_dir, path.stem) if coords_dir is not None else None
        except HistomilError as err:
            if on_bad_slide == "error":
                raise
            summary.skipped.append((path, str(err)))
            if log:
                log(f"skipped slide {err}")
            continue
        tiling = f"coords:{coords_file.resolve()}" if coords_file is not None else spec_signature(spec)
        if not overwrite and existing_complete(out_path, encoder, tiling):
            summary.files[path.stem] = out_path
            summary.existing.append(path.stem)
            if log:
                log(f"{path.name}: features already complete -> {out_path}")
        else:
            try:
                with open_slide(path, mpp=spec.slide_mpp) as slide:
                    if coords_file is not None:
                        plan = plan_from_coords(slide, coords_file)
                    else:
                        plan = plan_tiles(slide, spec)
                    write_slide_features(
                        out_path, slide, plan, encoder, spec=None if coords_file else spec, tiling=tiling,
                        batch_size=batch_size, num_workers=num_workers, progress=progress,
                    )
                summary.files[path.stem] = out_path
                summary.written.append(path.stem)
                summary.n_tiles[path.stem] = len(plan)
                if log:
                    log(f"{path.name}: {len(plan)} tiles encoded -> {out_path}")
            except HistomilError as err:
                if on_bad_slide == "error":
                    raise
                summary.skipped.append((path, str(err)))
                if log:
                    log(f"skipped bad slide {err}")
        if progress:
            progress("slides", i + 1, len(paths))
    summary.seconds = time.perf_counter() - t0
    return summary

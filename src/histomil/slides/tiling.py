"""Cut whole-slide images into tissue tiles at a fixed physical resolution.

:func:`plan_tiles` decides *where* (level-0 coordinates of a regular grid, kept where the tissue
mask covers at least ``min_tissue`` of the tile) and *how* (the pyramid level to read and the read
size): the target is a resolution (micrometres per pixel, or a magnification), so a 224-pixel tile
covers the same tissue area on every scanner. The level read is the coarsest one that is still at
least as fine as the target, so tiles are only ever shrunk, never enlarged.

:func:`tile_slide` writes the plan as ``<slide>.h5`` (dataset ``coords``, CLAM-compatible
attributes ``patch_size``/``patch_level``) plus PNG previews, and optionally the tile images as
JPEG files in a folder per slide (histomil's bag-folder format).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from histomil import __version__
from histomil.callbacks import Progress
from histomil.errors import HistomilError
from histomil.files import atomic_write
from histomil.slides.reader import DOWNSAMPLE_TOLERANCE, Slide, open_slide
from histomil.slides.tissue import TissueMethod, box_fractions, tissue_mask


class TilingSpec(BaseModel):
    """How to tile: tile size and target resolution, overlap, tissue filter and tissue detection."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int = Field(224, ge=8, description="tile side in pixels at the target resolution")
    mpp: float | None = Field(0.5, gt=0, description="target micrometres per pixel")
    magnification: float | None = Field(None, gt=0, description="target magnification (instead of mpp), e.g. 20")
    stride: int | None = Field(None, ge=1, description="grid step in target pixels; default tile_size (no overlap)")
    min_tissue: float = Field(0.5, ge=0, le=1, description="keep tiles whose tissue fraction is at least this")
    slide_mpp: float | None = Field(None, gt=0, description="level-0 um/px when the slide header has none")
    slide_magnification: float | None = Field(
        None, gt=0, description="objective power when the header has none (for a magnification target)"
    )
    level_tolerance: float = Field(
        DOWNSAMPLE_TOLERANCE, ge=0, le=0.1,
        description="relative slack when matching pyramid levels (and the scan resolution) to the target",
    )
    jpeg_quality: int = Field(90, ge=1, le=100)
    # tissue detection, on an overview whose longer side is mask_size pixels
    mask_size: int = Field(2048, ge=64, description="longer side of the overview the tissue mask is computed on")
    tissue_method: TissueMethod = "otsu_saturation"
    saturation_threshold: float = Field(0.08, ge=0, le=1)
    min_saturation: float = Field(0.05, ge=0, le=1)
    median_size: int = Field(5, ge=0)
    close_radius: int = Field(2, ge=0)
    open_radius: int = Field(2, ge=0)
    fill_holes: bool = True
    min_area_fraction: float = Field(0.0005, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _magnification_replaces_mpp(cls, data: object) -> object:
        # Asking for a magnification without mentioning mpp means "not the default mpp".
        if isinstance(data, dict) and data.get("magnification") is not None and "mpp" not in data:
            data = {**data, "mpp": None}
        return data

    @model_validator(mode="after")
    def _one_target(self) -> TilingSpec:
        if (self.mpp is None) == (self.magnification is None):
            raise ValueError("give exactly one target resolution: mpp (e.g. 0.5) or magnification (e.g. 20)")
        return self

    def tissue_params(self) -> dict[str, object]:
        """Keyword arguments for :func:`histomil.slides.tissue.tissue_mask`."""
        return {
            "method": self.tissue_method,
            "saturation_threshold": self.saturation_threshold,
            "min_saturation": self.min_saturation,
            "median_size": self.median_size,
            "close_radius": self.close_radius,
            "open_radius": self.open_radius,
            "fill_holes": self.fill_holes,
            "min_area_fraction": self.min_area_fraction,
        }


@dataclass
class TilePlan:
    """Where to cut one slide and how to read each tile."""

    slide_path: Path
    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y), row-major order
    tissue_fraction: np.ndarray  # (N,) float32 in [0, 1]
    level: int  # pyramid level read
    read_size: int  # pixels read at `level` per tile side (resized to tile_size if different)
    tile_size: int  # output tile side
    downsample: float  # target downsample relative to level 0
    patch_size_level0: int  # tile side in level-0 pixels
    stride_level0: int  # grid step in level-0 pixels
    target_mpp: float | None
    slide_mpp: float | None
    level0_dims: tuple[int, int]
    n_candidates: int  # grid positions before the tissue filter
    mask: np.ndarray = field(repr=False)  # (h, w) bool tissue mask of the overview
    thumbnail: np.ndarray = field(repr=False)  # (h, w, 3) uint8 overview

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _target_downsample(slide: Slide, spec: TilingSpec) -> tuple[float, float | None, float | None]:
    """(downsample from level 0, target mpp or None, slide mpp or None); errors name the missing metadata."""
    slide_mpp = spec.slide_mpp if spec.slide_mpp is not None else slide.mpp
    if spec.mpp is not None:
        if slide_mpp is None:
            raise HistomilError(
                f"{slide.path}: the slide header gives no resolution (micrometres per pixel), so tiles at "
                f"{spec.mpp} um/px cannot be cut; pass the scan resolution by hand, e.g. --slide-mpp 0.25 "
                "for a 40x scan or --slide-mpp 0.5 for 20x"
            )
        return spec.mpp / slide_mpp, spec.mpp, slide_mpp
    assert spec.magnification is not None
    objective = spec.slide_magnification if spec.slide_magnification is not None else slide.objective_power
    if objective is None:
        raise HistomilError(
            f"{slide.path}: the slide header gives no objective power, so tiles at {spec.magnification:g}x "
            "cannot be cut; pass it by hand, e.g. --slide-magnification 40, or ask for a resolution "
            "with --mpp (0.5 um/px is about 20x)"
        )
    downsample = objective / spec.magnification
    return downsample, (None if slide_mpp is None else slide_mpp * downsample), slide_mpp


def plan_tiles(slide: Slide, spec: TilingSpec) -> TilePlan:
    """Grid, pyramid level, read size and tissue filter for ``slide`` (no tile pixels are read)."""
    downsample, target_mpp, slide_mpp = _target_downsample(slide, spec)
    if downsample * (1 + spec.level_tolerance) < 1:
        have = f"{slide_mpp:g} um/px" if slide_mpp is not None else f"{slide.objective_power:g}x"
        want = f"{spec.mpp:g} um/px" if spec.mpp is not None else f"{spec.magnification:g}x"
        raise HistomilError(
            f"{slide.path}: the target {want} is finer than the scan ({have}); tiles are never enlarged, "
            "ask for a coarser resolution"
        )
    level = slide.best_level_for_downsample(downsample, spec.level_tolerance)
    level_ds = slide.level_downsamples[level]
    read_size = max(1, round(spec.tile_size * downsample / level_ds))
    patch0 = max(1, round(spec.tile_size * downsample))
    stride0 = max(1, round((spec.stride or spec.tile_size) * downsample))

    width, height = slide.dimensions
    xs = np.arange(0, width - patch0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, height - patch0 + 1, stride0, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)

    thumb = slide.thumbnail(spec.mask_size)
    mask = tissue_mask(thumb, **spec.tissue_params())  # type: ignore[arg-type]
    sx, sy = mask.shape[1] / width, mask.shape[0] / height  # mask pixels per level-0 pixel
    if len(grid):
        frac = box_fractions(
            mask, grid[:, 0] * sx, grid[:, 1] * sy, (grid[:, 0] + patch0) * sx, (grid[:, 1] + patch0) * sy
        )
    else:
        frac = np.zeros(0)
    keep = frac >= spec.min_tissue
    return TilePlan(
        slide_path=slide.path,
        coords=grid[keep].astype(np.int64),
        tissue_fraction=frac[keep].astype(np.float32),
        level=level,
        read_size=read_size,
        tile_size=spec.tile_size,
        downsample=float(downsample),
        patch_size_level0=patch0,
        stride_level0=stride0,
        target_mpp=target_mpp,
        slide_mpp=slide_mpp,
        level0_dims=(int(width), int(height)),
        n_candidates=len(grid),
        mask=mask,
        thumbnail=thumb,
    )


def read_tile(slide: Slide, plan: TilePlan, coord: Sequence[int]) -> np.ndarray:
    """The RGB ``uint8`` tile (tile_size, tile_size, 3) whose level-0 top-left is ``coord``."""
    region = slide.read_region((int(coord[0]), int(coord[1])), plan.level, plan.read_size)
    if plan.read_size != plan.tile_size:
        region = np.asarray(
            Image.fromarray(region).resize((plan.tile_size, plan.tile_size), Image.Resampling.LANCZOS)
        )
    return region


def iter_tiles(slide: Slide, plan: TilePlan) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Yield ``((x, y), tile)`` for every planned tile, one read at a time (memory stays flat)."""
    for x, y in plan.coords:
        yield (int(x), int(y)), read_tile(slide, plan, (x, y))


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def tiles_preview(plan: TilePlan) -> np.ndarray:
    """The overview with non-tissue tinted blue-grey and kept tiles outlined in green, for quality control."""
    thumb = plan.thumbnail.astype(np.float32)
    tinted = 0.6 * thumb + 0.4 * np.array([150.0, 160.0, 200.0], dtype=np.float32)
    out = np.where(plan.mask[..., None], thumb, tinted).round().astype(np.uint8)
    h, w = plan.mask.shape
    sx, sy = w / plan.level0_dims[0], h / plan.level0_dims[1]
    for x, y in plan.coords:
        x0, y0 = int(x * sx), int(y * sy)
        x1 = min(w - 1, max(x0, int((x + plan.patch_size_level0) * sx) - 1))
        y1 = min(h - 1, max(y0, int((y + plan.patch_size_level0) * sy) - 1))
        for ys, xs in ((y0, slice(x0, x1 + 1)), (y1, slice(x0, x1 + 1))):
            out[ys, xs] = (0, 160, 0)
        out[y0 : y1 + 1, x0] = (0, 160, 0)
        out[y0 : y1 + 1, x1] = (0, 160, 0)
    return out


def _write_tile_folder(
    slide: Slide, plan: TilePlan, folder: Path, quality: int, progress: Progress | None
) -> None:
    """Write ``folder/<x>_<y>.jpg`` for every tile, replacing ``folder`` only once all are written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)
        total = len(plan)
        for i, ((x, y), tile) in enumerate(iter_tiles(slide, plan)):
            Image.fromarray(tile).save(tmp / f"{x}_{y}.jpg", format="JPEG", quality=quality)
            if progress and (i % 64 == 0 or i == total - 1):
                progress("writing tile images", i + 1, total)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_plan(path: Path, plan: TilePlan, slide: Slide) -> None:
    """Write the tile coordinates and their description to ``path`` (HDF5) atomically."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=plan.coords.reshape(-1, 2).astype(np.int64))
        # CLAM-compatible: read_region(coord, patch_level, (patch_size, patch_size)) gives the tile
        # before resizing to tile_size; patch_size is therefore in pixels of patch_level.
        ds.attrs["patch_size"] = int(plan.read_size)
        ds.attrs["patch_level"] = int(plan.level)
        ds.attrs["patch_size_level0"] = int(plan.patch_size_level0)
        ds.attrs["stride_level0"] = int(plan.stride_level0)
        ds.attrs["downsample"] = float(plan.downsample)
        ds.attrs["level_downsample"] = float(slide.level_downsamples[plan.level])
        ds.attrs["tile_size"] = int(plan.tile_size)
        ds.attrs["read_size"] = int(plan.read_size)
        ds.attrs["level"] = int(plan.level)
        # facts the slide does not record are left out, never written as NaN (other tools' readers choke on it)
        for key, value in (("target_mpp", plan.target_mpp), ("slide_mpp", plan.slide_mpp)):
            if value is not None:
                ds.attrs[key] = float(value)
        ds.attrs["level_dim"] = np.asarray(slide.level_dimensions[plan.level], dtype=np.int64)  # of patch_level
        ds.attrs["level0_dim"] = np.asarray(plan.level0_dims, dtype=np.int64)
        ds.attrs["level_dims"] = np.asarray(slide.level_dimensions, dtype=np.int64)
        ds.attrs["name"] = slide.name
        ds.attrs["slide_path"] = str(slide.path)
        f.create_dataset("tissue_fraction", data=plan.tissue_fraction.astype(np.float32))
        f.attrs["slide_name"] = slide.name
        f.attrs["slide_path"] = str(slide.path)
        f.attrs["n_candidates"] = int(plan.n_candidates)
        if slide.objective_power is not None:
            f.attrs["objective_power"] = float(slide.objective_power)
        f.attrs["histomil_version"] = __version__


def tile_slide(
    path: str | Path,
    out_dir: str | Path,
    spec: TilingSpec,
    save_images: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Tile one slide into ``out_dir``; returns the path of ``<slide_stem>.h5``.

    Writes ``<stem>.h5`` (coordinates, last, so its presence means the slide is complete),
    ``<stem>_mask.png`` (tissue mask of the overview), ``<stem>_tiles.png`` (kept tiles outlined) and,
    with ``save_images``, ``<stem>/<x>_<y>.jpg`` (level-0 top-left in the file name).
    """
    return _tile_one(path, out_dir, spec, save_images, progress)[0]


def _tile_one(
    path: str | Path, out_dir: str | Path, spec: TilingSpec, save_images: bool, progress: Progress | None
) -> tuple[Path, int]:
    out_dir = Path(out_dir)
    with open_slide(path, mpp=spec.slide_mpp) as slide:
        plan = plan_tiles(slide, spec)
        stem = slide.name
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_png(out_dir / f"{stem}_mask.png", (plan.mask.astype(np.uint8) * 255))
        _write_png(out_dir / f"{stem}_tiles.png", tiles_preview(plan))
        if save_images:
            _write_tile_folder(slide, plan, out_dir / stem, spec.jpeg_quality, progress)
        h5_path = out_dir / f"{stem}.h5"
        write_plan(h5_path, plan, slide)
    return h5_path, len(plan)


@dataclass
class TilingSummary:
    """Outcome of :func:`tile_slides`."""

    written: list[Path] = field(default_factory=list)  # one .h5 per tiled slide
    n_tiles: dict[str, int] = field(default_factory=dict)  # slide stem -> kept tiles
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (slide, reason)


def tile_slides(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    spec: TilingSpec,
    save_images: bool = False,
    on_bad_slide: Literal["error", "skip"] = "error",
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> TilingSummary:
    """Tile several slides; a bad slide stops everything (``"error"``) or is listed and skipped (``"skip"``)."""
    if on_bad_slide not in ("error", "skip"):
        raise ValueError(f"on_bad_slide must be 'error' or 'skip', got {on_bad_slide!r}")
    paths = [Path(p) for p in paths]
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems and stems[p.stem] != p:
            raise HistomilError(f"{p}: has the same name as {stems[p.stem]}; their outputs would overwrite each other")
        stems[p.stem] = p
    summary = TilingSummary()
    for i, p in enumerate(paths):
        try:
            h5_path, n = _tile_one(p, out_dir, spec, save_images, progress)
            summary.written.append(h5_path)
            summary.n_tiles[p.stem] = n
            if log:
                log(f"{p.name}: {n} tiles -> {h5_path}")
        except HistomilError as err:
            if on_bad_slide == "error":
                raise
            summary.skipped.append((p, str(err)))
            if log:
                log(f"skipped bad slide {err}")
        if progress:
            progress("tiling slides", i + 1, len(paths))
    return summary

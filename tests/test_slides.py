"""Whole-slide reading, tissue detection and tiling: real .svs slides and synthetic pyramidal TIFFs."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image
from pydantic import ValidationError
from slide_fixtures import (
    BLUE,
    MARKER,
    PINK,
    PURPLE,
    RECT_A,
    SIZE,
    make_slide,
    truth_mask,
    write_pyramid,
)

from histomil.errors import HistomilError
from histomil.slides import (
    TilingSpec,
    iter_tiles,
    open_slide,
    plan_tiles,
    read_tile,
    tile_slide,
    tile_slides,
)
from histomil.slides.tissue import box_fractions, saturation, tissue_mask

CMU = "wsi/CMU-1-Small-Region.svs"
TCGA = "wsi/TCGA-CR-7395-01A-01-TS1.svs"
FAST = {"mask_size": 512}  # small overview: fast, and one mask pixel = 8 level-0 pixels here


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slide(tmp_path_factory.mktemp("slides"))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ---------------------------------------------------------------------------------------- reader


def test_real_svs_metadata_and_region(shared_data: Path) -> None:
    with open_slide(shared_data / CMU) as s:
        assert s.dimensions == (2220, 2967) and s.level_count == 1
        assert s.mpp == pytest.approx(0.499) and s.objective_power == 20
        region = s.read_region((1000, 1500), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        thumb = s.thumbnail(256)
        assert max(thumb.shape[:2]) == 256 and thumb.shape[2] == 3
    with open_slide(shared_data / TCGA) as s:
        assert s.mpp is None and s.level_count == 2
    with open_slide(shared_data / TCGA, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.level_mpp(1) == pytest.approx(0.25 * 2.0005, rel=1e-3)


def test_synthetic_tiff_geometry_and_transparent_areas_are_white(synth: Path) -> None:
    with open_slide(synth) as s:
        assert s.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256))
        assert s.level_downsamples == (1.0, 4.0, 16.0)
        assert s.mpp == pytest.approx(0.25)
        assert [s.best_level_for_downsample(d) for d in (0.5, 1, 3.9, 3.99, 4, 15, 16, 100)] == [0, 0, 0, 1, 1, 1, 2, 2]
        # reading past the slide's right edge: OpenSlide returns transparent pixels, shown as white
        region = s.read_region((SIZE - 8, 600), 0, (16, 4))
        assert (region[:, 8:] == 255).all()


@pytest.mark.parametrize("content", [b"", b"not a slide at all", None])
def test_corrupt_or_unsupported_file_is_one_line_error(tmp_path: Path, synth: Path, content: bytes | None) -> None:
    bad = tmp_path / "broken.svs"
    if content is None:  # a truncated pyramidal TIFF
        bad.write_bytes(synth.read_bytes()[:20000])
    else:
        bad.write_bytes(content)
    with pytest.raises(HistomilError) as err:
        open_slide(bad)
    msg = str(err.value)
    assert "broken.svs" in msg and "\n" not in msg
    with pytest.raises(HistomilError, match="no such slide file"):
        open_slide(tmp_path / "missing.svs")


def test_corrupt_tile_data_is_one_line_error_when_reading(tmp_path: Path, synth: Path) -> None:
    bad = tmp_path / "bad_tiles.tif"
    shutil.copy(synth, bad)
    with tifffile.TiffFile(bad) as tf:
        spans = list(zip(tf.pages[0].dataoffsets, tf.pages[0].databytecounts))
    with open(bad, "r+b") as f:  # destroy level 0's compressed tiles, keep the header and other levels
        for offset, count in spans:
            f.seek(offset)
            f.write(b"\x00" * count)
    with open_slide(bad) as s:
        plan = plan_tiles(s, TilingSpec(mpp=0.25, mask_size=256))  # the overview comes from level 2
        assert len(plan) > 0 and plan.level == 0
        with pytest.raises(HistomilError) as err:
            next(iter_tiles(s, plan))
    assert "bad_tiles.tif" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- tissue


def test_saturation_values() -> None:
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [200, 100, 100], [10, 5, 0]]], np.uint8)
    assert saturation(rgb)[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])


def test_tissue_mask_on_noisy_disc_blank_and_constant_images() -> None:
    rng = np.random.default_rng(0)
    n = 256
    yy, xx = np.mgrid[:n, :n]
    disc = (xx - 128) ** 2 + (yy - 120) ** 2 <= 60**2
    img = np.where(disc[..., None], np.array(PINK), np.array([245, 245, 245])).astype(np.int16)
    img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    img[10:13, 10:13] = PURPLE  # a speck of dust: removed
    mask = tissue_mask(img)
    assert iou(mask, disc) > 0.97
    assert not mask[:20, :20].any()
    # blank slides: JPEG-like noise on white, and perfectly constant images, give empty masks
    blank = np.clip(250 + rng.integers(-5, 6, (n, n, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(blank).any()
    for value in (0, 255):
        assert not tissue_mask(np.full((64, 64, 3), value, np.uint8)).any()
    assert tissue_mask(blank, method="all").all()


def test_tissue_mask_fills_holes_and_drops_small_components() -> None:
    n = 200
    yy, xx = np.mgrid[:n, :n]
    r2 = (xx - 100) ** 2 + (yy - 100) ** 2
    ring = (r2 <= 70**2) & (r2 > 30**2)
    img = np.full((n, n, 3), 255, np.uint8)
    img[ring] = PINK
    img[5:9, 180:184] = PINK  # 16 px < 0.0005 * 40000 = 20 px
    params = {"median_size": 0, "close_radius": 0, "open_radius": 0}
    filled = tissue_mask(img, **params)
    assert filled[100, 100] and filled.sum() == (r2 <= 70**2).sum()
    hollow = tissue_mask(img, fill_holes=False, **params)
    assert not hollow[100, 100] and hollow.sum() == ring.sum()
    assert tissue_mask(img, min_area_fraction=0, **params)[5:9, 180:184].all()
    # fixed threshold: pale tissue (saturation ~0.06) is tissue only below the threshold
    pale = np.full((50, 50, 3), (250, 240, 245), np.uint8)
    assert tissue_mask(pale, method="fixed_saturation", saturation_threshold=0.03).all()
    assert not tissue_mask(pale, method="fixed_saturation", saturation_threshold=0.08).any()


def test_box_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((40, 50)) > 0.6
    up = np.kron(mask, np.ones((4, 4), bool))  # 4x finer: quarter-pixel boxes become whole pixels
    x0 = rng.integers(0, 160, 30)
    y0 = rng.integers(0, 120, 30)
    x1 = x0 + rng.integers(1, 40, 30)
    y1 = y0 + rng.integers(1, 40, 30)
    got = box_fractions(mask, x0 / 4, y0 / 4, x1 / 4, y1 / 4)
    want = [up[b:d, a:c].mean() for a, b, c, d in zip(x0, y0, x1, y1)]
    np.testing.assert_allclose(got, want, atol=1e-9)
    # a box half outside the mask counts the outside as background
    assert box_fractions(np.ones((4, 4), bool), np.array([2.0]), np.array([0.0]), np.array([6.0]), np.array([4.0]))[0] == 0.5


# ---------------------------------------------------------------------------------------- spec and plan


def test_tiling_spec_validation() -> None:
    assert TilingSpec().mpp == 0.5 and TilingSpec().magnification is None
    spec = TilingSpec(magnification=20)
    assert spec.mpp is None and spec.magnification == 20
    with pytest.raises(ValidationError, match="exactly one"):
        TilingSpec(mpp=0.5, magnification=20)
    with pytest.raises(ValidationError, match="exactly one"):
        TilingSpec(mpp=None)
    with pytest.raises(ValidationError):
        TilingSpec(tile_sise=256)  # typo: extra fields are rejected
    with pytest.raises(ValidationError):
        TilingSpec(min_tissue=1.5)


@pytest.mark.parametrize(
    ("target_mpp", "level", "read_size", "patch0"),
    [
        (0.25, 0, 224, 224),  # the scan resolution itself
        (0.5, 0, 448, 448),  # between levels 0 and 1: read level 0 and shrink
        (0.9, 0, 806, 806),
        (1.0, 1, 224, 896),  # exactly level 1
        (2.0, 1, 448, 1792),
        (4.0, 2, 224, 3584),  # exactly level 2
    ],
)
def test_level_choice_and_read_size(synth: Path, target_mpp: float, level: int, read_size: int, patch0: int) -> None:
    with open_slide(synth) as s:
        plan = plan_tiles(s, TilingSpec(mpp=target_mpp, **FAST))
    assert (plan.level, plan.read_size, plan.patch_size_level0, plan.tile_size) == (level, read_size, patch0, 224)
    # coordinates: level-0 pixels on a grid of step patch0, tiles fully inside the slide
    assert plan.coords.dtype == np.int64
    assert (plan.coords % patch0 == 0).all() and (plan.coords + patch0 <= SIZE).all()
    assert plan.n_candidates == (SIZE // patch0) ** 2


def test_magnification_target_and_too_fine_target(synth: Path) -> None:
    with open_slide(synth) as s:
        assert s.objective_power is None  # generic TIFF: no objective power in the header
        with pytest.raises(HistomilError, match=r"synthetic\.tif.*objective power.*--slide-magnification"):
            plan_tiles(s, TilingSpec(magnification=10, **FAST))
        plan = plan_tiles(s, TilingSpec(magnification=10, slide_magnification=40, **FAST))
        assert (plan.level, plan.read_size, plan.target_mpp) == (1, 224, pytest.approx(1.0))
        with pytest.raises(HistomilError, match=r"synthetic\.tif.*finer than the scan"):
            plan_tiles(s, TilingSpec(mpp=0.1, **FAST))


def test_tissue_detection_matches_painted_regions(synth: Path) -> None:
    with open_slide(synth) as s:
        plan = plan_tiles(s, TilingSpec(mpp=1.0, **FAST))
    truth = truth_mask(SIZE // plan.mask.shape[0])
    assert plan.mask.shape == truth.shape == (512, 512)
    assert iou(plan.mask, truth) > 0.97


@pytest.mark.parametrize("min_tissue", [0.5, 1.0])
def test_kept_tiles_lie_in_tissue_and_full_tissue_tiles_are_kept(synth: Path, min_tissue: float) -> None:
    with open_slide(synth) as s:
        plan = plan_tiles(s, TilingSpec(mpp=0.5, min_tissue=min_tissue, **FAST))
    truth = truth_mask(8)
    p = plan.patch_size_level0 // 8  # 448 / 8 = 56 mask pixels per tile
    true_frac = {(x, y): truth[y // 8 : y // 8 + p, x // 8 : x // 8 + p].mean()
                 for x in range(0, SIZE - 447, 448) for y in range(0, SIZE - 447, 448)}
    kept = {tuple(c) for c in plan.coords.tolist()}
    assert all(true_frac[c] >= min_tissue - 0.05 for c in kept)
    assert all(c in kept for c, f in true_frac.items() if f >= min_tissue + 0.05)
    np.testing.assert_allclose(plan.tissue_fraction, [true_frac[c] for c in map(tuple, plan.coords.tolist())], atol=0.05)
    assert len(kept) >= 6


def test_tiles_read_through_the_plan_show_the_painted_content(synth: Path) -> None:
    mx, my, side = MARKER
    with open_slide(synth) as s:
        for target, (cx, cy) in ((1.0, (1792, 2688)), (0.5, (1792, 2688)), (0.9, (1612, 2418))):
            plan = plan_tiles(s, TilingSpec(mpp=target, **FAST))
            assert (cx, cy) in {tuple(c) for c in plan.coords.tolist()}
            tile = read_tile(s, plan, (cx, cy))
            assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
            ds = plan.downsample
            # the blue marker sits where its level-0 position maps inside the tile
            x0, y0 = (mx - cx) / ds, (my - cy) / ds
            inner = tile[int(y0) + 2 : int(y0 + side / ds) - 2, int(x0) + 2 : int(x0 + side / ds) - 2]
            assert inner.size and np.abs(inner.astype(int) - BLUE).max() <= 2
            # and below it the tile is the pink of rectangle C
            pink = tile[int(y0 + side / ds) + 3 :, :]
            assert pink.size and np.abs(pink.reshape(-1, 3).mean(0) - PINK).max() < 2
        # a tile inside rectangle A at level 1 (no resizing): exactly the painted colour
        plan = plan_tiles(s, TilingSpec(mpp=1.0, min_tissue=0.0, **FAST))
        tiles = dict(iter_tiles(s, plan))
        assert len(tiles) == 16
        x0, y0, x1, y1 = RECT_A
        assert (tiles[(896, 896)][: (y1 - 896) // 4, : (x1 - 896) // 4] == PINK).all()
        assert (tiles[(0, 0)][: 512 // 4, :] == 255).all()


def test_real_slides_plan_and_missing_resolution(shared_data: Path) -> None:
    with open_slide(shared_data / CMU) as s:
        plan = plan_tiles(s, TilingSpec(**FAST))
        assert (plan.level, plan.read_size, plan.patch_size_level0) == (0, 224, 224)
        assert 20 <= len(plan) < plan.n_candidates == 9 * 13
        assert (plan.coords[:, 0] + 224 <= 2220).all() and (plan.coords[:, 1] + 224 <= 2967).all()
        assert plan.coords[:, 1].max() > 2220  # x is the first column, y the second (the slide is taller)
        kept = read_tile(s, plan, plan.coords[0])
        assert (saturation(kept) > 0.1).mean() > 0.4  # kept tiles are stained tissue ...
        white = s.read_region((0, 0), 0, 224)
        assert (saturation(white) > 0.1).mean() < 0.05  # ... the top-left corner is background
    with open_slide(shared_data / TCGA) as s:
        with pytest.raises(HistomilError) as err:
            plan_tiles(s, TilingSpec(**FAST))
        msg = str(err.value)
        assert "TCGA-CR-7395-01A-01-TS1.svs" in msg and "--slide-mpp 0.25" in msg and "\n" not in msg
        # with the resolution given by hand: level 1 (downsample 2.0005 counts as 2), no resizing
        plan = plan_tiles(s, TilingSpec(slide_mpp=0.25, **FAST))
        assert (plan.level, plan.read_size, plan.patch_size_level0) == (1, 224, 448)
        assert len(plan) > 30


# ---------------------------------------------------------------------------------------- outputs


def test_tile_slide_writes_h5_previews_and_tile_folder(synth: Path, tmp_path: Path) -> None:
    spec = TilingSpec(mpp=2.0, min_tissue=0.2, **FAST)
    out = tile_slide(synth, tmp_path / "out", spec, save_images=True)
    assert out == tmp_path / "out" / "synthetic.h5"
    with open_slide(synth) as s:
        plan = plan_tiles(s, spec)
    with h5py.File(out, "r") as f:
        coords = f["coords"]
        assert coords.dtype == np.int64 and coords.shape == (len(plan), 2)
        np.testing.assert_array_equal(coords[:], plan.coords)
        a = coords.attrs
        # CLAM convention: read_region(coord, patch_level, (patch_size, patch_size))
        assert (a["patch_level"], a["patch_size"], a["patch_size_level0"]) == (1, 448, 1792)
        assert (a["tile_size"], a["level"], a["read_size"]) == (224, 1, 448)
        assert a["target_mpp"] == 2.0 and a["slide_mpp"] == pytest.approx(0.25)
        assert a["level0_dim"].tolist() == [SIZE, SIZE] and a["level_dim"].tolist() == [1024, 1024] and a["name"] == "synthetic"
        np.testing.assert_allclose(f["tissue_fraction"][:], plan.tissue_fraction)
        assert "objective_power" not in f.attrs  # the generic TIFF records none: left out, never NaN
    mask_png = np.asarray(Image.open(tmp_path / "out" / "synthetic_mask.png"))
    np.testing.assert_array_equal(mask_png > 0, plan.mask)
    assert Image.open(tmp_path / "out" / "synthetic_tiles.png").size == (512, 512)
    jpgs = sorted((tmp_path / "out" / "synthetic").glob("*.jpg"))
    assert {p.name for p in jpgs} == {f"{x}_{y}.jpg" for x, y in plan.coords.tolist()}
    assert {"0_0.jpg", "1792_0.jpg", "1792_1792.jpg"} <= {p.name for p in jpgs}
    # tile (1792, 1792) covers level-0 x 1792..3584, y 1792..3584 at 8 level-0 pixels per tile pixel
    tile = np.asarray(Image.open(tmp_path / "out" / "synthetic" / "1792_1792.jpg")).astype(float)
    assert tile.shape == (224, 224, 3)
    assert np.abs(tile[:80].reshape(-1, 3).mean(0) - 255).max() < 2  # y < 2432: background
    assert np.abs(tile[100:130, 40:150].reshape(-1, 3).mean(0) - PINK).max() < 4  # inside rectangle C
    assert np.abs(tile[140:144, 28:32].reshape(-1, 3).mean(0) - BLUE).max() < 12  # the marker at (2000, 2900)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # rerunning replaces the outputs in place
    assert tile_slide(synth, tmp_path / "out", spec, save_images=True) == out
    assert len(list((tmp_path / "out" / "synthetic").glob("*.jpg"))) == len(jpgs)


def test_blank_slide_gives_empty_plan(tmp_path: Path) -> None:
    blank = write_pyramid(tmp_path / "blank.tif", np.full((1024, 1024, 3), 255, np.uint8), downsamples=(1, 4))
    out = tile_slide(blank, tmp_path, TilingSpec(mpp=0.5, **FAST))
    with h5py.File(out, "r") as f:
        assert f["coords"].shape == (0, 2) and f.attrs["n_candidates"] == 2 * 2


def test_tile_slides_skip_lists_bad_slides_and_error_mode_stops(synth: Path, tmp_path: Path, shared_data: Path) -> None:
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"\x00" * 1000)
    spec = TilingSpec(mpp=1.0, **FAST)
    lines: list[str] = []
    summary = tile_slides([synth, bad, shared_data / TCGA], tmp_path / "out", spec, on_bad_slide="skip", log=lines.append)
    assert summary.written == [tmp_path / "out" / "synthetic.h5"] and summary.n_tiles["synthetic"] > 0
    assert [p for p, _ in summary.skipped] == [bad, shared_data / TCGA]
    assert "corrupt.svs" in summary.skipped[0][1] and "--slide-mpp" in summary.skipped[1][1]
    assert any("skipped" in line and "corrupt.svs" in line for line in lines)
    with pytest.raises(HistomilError, match="corrupt.svs"):
        tile_slides([synth, bad], tmp_path / "out2", spec, on_bad_slide="error")
    twin = tmp_path / "other" / "synthetic.tif"
    twin.parent.mkdir()
    shutil.copy(synth, twin)
    with pytest.raises(HistomilError, match="same name"):
        tile_slides([synth, twin], tmp_path / "out3", spec)

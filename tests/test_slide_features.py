"""Slide features read straight from the slide: equality with read_tile + encode, file layout, resume."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from slide_fixtures import make_slide, paint, write_pyramid
from torch import nn
from typer.testing import CliRunner

from histomil.errors import HistomilError
from histomil.features.encoders import EncoderInfo, TileEncoder, build_encoder
from histomil.features.formats import detect_format, load_any_features
from histomil.features.store import read_feature_bag
from histomil.slides import TilingSpec, open_slide, plan_tiles, read_tile, tile_slide
from histomil.slides.features import (
    existing_complete,
    extract_slide_features,
    find_slides,
    is_slide_source,
    iter_tile_batches,
    plan_from_coords,
)

CMU = "wsi/CMU-1-Small-Region.svs"
# 64 px tiles at 1 um/px on the 0.25 um/px synthetic slide: read 64 px at level 1 (downsample 4)
SPEC = TilingSpec(tile_size=64, mpp=1.0, mask_size=512)
# 0.75 um/px: downsample 3, read 768 px at level 0 and shrink (the resize path)
SPEC_RESIZE = TilingSpec(tile_size=64, mpp=0.75, mask_size=512)


class QuadrantMeans(nn.Module):
    """A fast, exact stand-in encoder: mean of each colour channel in each quadrant (12 numbers)."""

    num_features = 12

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, 2, h // 2, 2, w // 2).mean(dim=(3, 5)).flatten(1)


def fake_encoder(precision: str = "fp32") -> TileEncoder:
    info = EncoderInfo("quadrant_means", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 12)
    return TileEncoder(QuadrantMeans(), info, precision=precision).eval()


class Failing(TileEncoder):
    """Fails on the second batch, like an interrupted run."""

    calls = 0

    def encode(self, tiles, batch_size=64):  # type: ignore[override]
        Failing.calls += 1
        if Failing.calls == 2:
            raise KeyboardInterrupt
        return super().encode(tiles, batch_size)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slide(tmp_path_factory.mktemp("slides"))


def expected_features(slide_path: Path, spec: TilingSpec, encoder: TileEncoder) -> tuple[np.ndarray, np.ndarray]:
    with open_slide(slide_path) as slide:
        plan = plan_tiles(slide, spec)
        tiles = np.stack([read_tile(slide, plan, c) for c in plan.coords])
    return plan.coords, encoder.encode(tiles)


# ---------------------------------------------------------------------------- equality & layout


@pytest.mark.parametrize("spec, workers", [(SPEC, 0), (SPEC, 1), (SPEC_RESIZE, 1)])
def test_features_equal_read_tile_then_encode(synth: Path, tmp_path: Path, spec: TilingSpec, workers: int) -> None:
    enc = fake_encoder()
    s = extract_slide_features([synth], tmp_path, enc, spec, batch_size=7, num_workers=workers)
    coords, want = expected_features(synth, spec, enc)
    bag = read_feature_bag(s.files["synthetic"])
    assert len(bag) == len(coords) > 20 and s.n_tiles == {"synthetic": len(coords)}
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_allclose(bag.features, want, rtol=0, atol=1e-6)
    # the tiles differ (pink, purple, edges): a constant feature would pass the equality trivially
    assert np.unique(bag.features.round(4), axis=0).shape[0] > 3


def test_h5_layout_for_clam_trident_and_histomil(synth: Path, tmp_path: Path) -> None:
    enc = fake_encoder()
    path = extract_slide_features([synth], tmp_path, enc, SPEC).files["synthetic"]
    with h5py.File(path) as f:
        n = f["features"].shape[0]
        assert f["features"].shape == (n, 12) and f["features"].dtype == np.float32
        assert f["features"].attrs["encoder"] == "quadrant_means"
        assert f["coords"].shape == (n, 2) and f["coords"].dtype == np.int64
        a = dict(f["coords"].attrs)
        assert (a["patch_size"], a["patch_level"], a["patch_size_level0"]) == (64, 1, 256)
        assert a["tile_size"] == 64 and a["target_mpp"] == pytest.approx(1.0) and a["slide_mpp"] == pytest.approx(0.25)
        assert (a["level0_width"], a["level0_height"], a["overlap"]) == (4096, 4096, 0)
        x, y = f["coords"][3]
        assert f["tile_paths"][3].decode() == f"{x}_{y}"
        assert f.attrs["bag_id"] == "synthetic" and f.attrs["label"] == -1
        assert f.attrs["precision"] == "fp32" and f.attrs["feature_dim"] == 12
    # CLAM's reading rule: read_region(coord, patch_level, patch_size) gives the tile
    with open_slide(synth) as slide, h5py.File(path) as f:
        x, y = f["coords"][0]
        region = slide.read_region((int(x), int(y)), int(a["patch_level"]), int(a["patch_size"]))
        small = paint(scale=4)[y // 4 : y // 4 + 64, x // 4 : x // 4 + 64]
        np.testing.assert_array_equal(region, small)
    bag = load_any_features(path)
    assert detect_format(path) == "histomil" and bag.bag_id == "synthetic" and bag.label is None
    assert bag.attrs["encoder"] == "quadrant_means"


def test_real_svs_with_efficientnet_matches_read_tile(shared_data: Path, tmp_path: Path) -> None:
    enc = build_encoder("efficientnet_lite0", precision="fp32")
    spec = TilingSpec(mpp=1.0)  # CMU is 0.499 um/px: read 449 px at level 0, shrink to 224 (few tiles: fast)
    s = extract_slide_features([shared_data / CMU], tmp_path, enc, spec, batch_size=16, num_workers=1)
    coords, want = expected_features(shared_data / CMU, spec, enc)
    bag = read_feature_bag(s.files["CMU-1-Small-Region"])
    assert 6 <= len(bag) <= 24 and bag.features.shape[1] == 1280
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_allclose(bag.features, want, rtol=1e-4, atol=1e-4)
    with h5py.File(s.files["CMU-1-Small-Region"]) as f:
        assert (f["coords"].attrs["patch_size"], f["coords"].attrs["patch_level"]) == (449, 0)
        assert f["coords"].attrs["level0_magnification"] == 20
        assert f["features"].attrs["encoder"] == "efficientnet_lite0"


# ------------------------------------------------------------------------------------- resume


def test_resume_skips_complete_files_and_redoes_changed_ones(synth: Path, tmp_path: Path) -> None:
    enc = fake_encoder()
    first = extract_slide_features([synth], tmp_path, enc, SPEC)
    path = first.files["synthetic"]
    assert first.written == ["synthetic"]
    stamp = path.stat().st_mtime_ns
    again = extract_slide_features([synth], tmp_path, enc, SPEC)
    assert again.existing == ["synthetic"] and again.written == [] and path.stat().st_mtime_ns == stamp
    # another tiling, another precision: the old file does not count as done
    other = TilingSpec(tile_size=64, mpp=1.0, mask_size=512, min_tissue=0.9)
    assert not existing_complete(path, enc, '{"other": 1}')
    assert extract_slide_features([synth], tmp_path, enc, other).written == ["synthetic"]
    assert extract_slide_features([synth], tmp_path, fake_encoder("bf16"), other).written == ["synthetic"]
    # a damaged file is redone
    path.write_bytes(b"truncated")
    assert extract_slide_features([synth], tmp_path, enc, SPEC).written == ["synthetic"]
    assert read_feature_bag(path).features.shape[1] == 12


def test_interrupted_run_leaves_no_file(synth: Path, tmp_path: Path) -> None:
    Failing.calls = 0
    enc = Failing(QuadrantMeans(), fake_encoder().info)
    with pytest.raises(KeyboardInterrupt):
        extract_slide_features([synth], tmp_path, enc, SPEC, batch_size=8, num_workers=0)
    assert os.listdir(tmp_path) == []  # neither a final nor a temporary file


def test_iter_tile_batches_streams_in_order(synth: Path) -> None:
    with open_slide(synth) as slide:
        plan = plan_tiles(slide, SPEC)
    starts, total = [], 0
    for start, tiles in iter_tile_batches(synth, plan, batch_size=10, num_workers=1):
        assert tiles.dtype == np.uint8 and tiles.shape[1:] == (64, 64, 3) and len(tiles) <= 10
        starts.append(start)
        total += len(tiles)
    assert starts == list(range(0, len(plan), 10)) and total == len(plan)


# --------------------------------------------------------------------------- coordinates files


def test_coords_from_histomil_tile_output(synth: Path, tmp_path: Path) -> None:
    tile_slide(synth, tmp_path / "tiles", SPEC_RESIZE)
    enc = fake_encoder()
    s = extract_slide_features([synth], tmp_path / "f", enc, SPEC, coords_dir=tmp_path / "tiles")
    coords, want = expected_features(synth, SPEC_RESIZE, enc)  # the coordinates file's tiling, not SPEC
    bag = read_feature_bag(s.files["synthetic"])
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_allclose(bag.features, want, atol=1e-6)
    with pytest.raises(HistomilError, match="no coordinates file"):
        extract_slide_features([synth], tmp_path / "g", enc, SPEC, coords_dir=tmp_path)


def test_coords_from_trident_style_attributes(synth: Path, tmp_path: Path) -> None:
    p = tmp_path / "synthetic.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("coords", data=np.array([[512, 512], [1024, 1024]]))
        ds.attrs.update({"patch_size": 256, "patch_size_level0": 1024, "level0_magnification": 40,
                         "target_magnification": 10})
    with open_slide(synth) as slide:
        plan = plan_from_coords(slide, p)
        assert (plan.level, plan.read_size, plan.tile_size, plan.patch_size_level0) == (1, 256, 256, 1024)
        np.testing.assert_array_equal(read_tile(slide, plan, (512, 512)), paint(scale=4)[128:384, 128:384])
    with h5py.File(p, "a") as f:
        for k in list(f["coords"].attrs):
            del f["coords"].attrs[k]
    with open_slide(synth) as slide, pytest.raises(HistomilError, match="do not give the tile size"):
        plan_from_coords(slide, p)


# ------------------------------------------------------------------------------- bad input


def test_bad_and_empty_slides(synth: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00garbage")
    blank = write_pyramid(tmp_path / "blank.tif", np.full((1024, 1024, 3), 255, np.uint8))
    enc = fake_encoder()
    with pytest.raises(HistomilError, match=r"broken\.svs"):
        extract_slide_features([bad, synth], tmp_path / "out", enc, SPEC)
    s = extract_slide_features([bad, blank, synth], tmp_path / "out", enc, SPEC, on_bad_slide="skip")
    assert s.written == ["synthetic"]
    assert [p.name for p, _ in s.skipped] == ["broken.svs", "blank.tif"]
    assert "no tissue tiles" in s.skipped[1][1]
    assert sorted(os.listdir(tmp_path / "out")) == ["synthetic.h5"]


def test_finding_slides(synth: Path, tmp_path: Path) -> None:
    folder = synth.parent
    assert find_slides([folder]) == [synth] and is_slide_source(folder) and is_slide_source(synth)
    bags = tmp_path / "bags"
    (bags / "case1").mkdir(parents=True)
    (bags / "labels.csv").write_text("case,y_true\ncase1,1\n")
    assert not is_slide_source(bags) and not is_slide_source(bags / "labels.csv")
    with pytest.raises(HistomilError, match="no slide files in this folder"):
        find_slides([bags])
    with pytest.raises(HistomilError, match="no such slide file"):
        find_slides([tmp_path / "missing.svs"])
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "synthetic.tif"
    twin.write_bytes(synth.read_bytes())
    with pytest.raises(HistomilError, match="same name"):
        find_slides([synth, twin])


# ----------------------------------------------------------------------------------- commands


def _app():
    import typer

    from histomil.commands.slides import slide_features_cmd, tile_cmd

    app = typer.Typer()
    app.command("tile")(tile_cmd)
    app.command("slides")(slide_features_cmd)
    return app


def test_tile_command(synth: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(_app(), ["tile", str(synth), "--out", str(tmp_path), "--tile-size", "64", "--mpp", "1"])
    assert r.exit_code == 0, r.output
    assert "1 slides tiled" in r.output
    with h5py.File(tmp_path / "synthetic.h5") as f:
        assert f["coords"].attrs["patch_size_level0"] == 256
    r = CliRunner().invoke(_app(), ["tile", str(synth), "--out", str(tmp_path), "--mpp", "1", "--magnification", "20"])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(_app(), ["tile", str(synth), "--out", str(tmp_path), "--min-tissue", "2"])
    assert r.exit_code == 2 and "min_tissue" in r.output


def test_slide_features_command_errors_are_one_line(synth: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(_app(), ["slides", str(synth), "--out", str(tmp_path), "--precision", "fp8"])
    assert r.exit_code == 2 and "--precision must be one of auto, fp32, bf16, fp16" in r.output
    r = CliRunner().invoke(_app(), ["slides", str(synth), "--out", str(tmp_path), "--precision", "fp16"])
    assert r.exit_code == 2 and r.output.strip() == "error: precision fp16 runs only on a CUDA GPU; use bf16 or fp32 here"
    r = CliRunner().invoke(_app(), ["slides", str(tmp_path / "nope.svs"), "--out", str(tmp_path), "--encoder", "x"])
    assert r.exit_code == 2 and "unknown encoder" in r.output

"""Heatmaps and GeoJSON from features that CLAM, TRIDENT and STAMP wrote (../shared/interop), with no
encoder: the squares must land on the tiles the tool cut, at the size it cut them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from histomil.cli import app
from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.slides.cached import find_feature_file, slide_bag_from_features
from histomil.slides.features import find_coords_file
from histomil.slides.reader import open_slide
from histomil.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

INTEROP = Path(__file__).resolve().parents[1].parent / "shared" / "interop"
TRIDENT10 = INTEROP / "trident" / "10x_256px_0px_overlap"
CLAM = INTEROP / "clam"
STAMP = INTEROP / "stamp"
SLIDE = "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def cmu(shared_data: Path) -> Path:
    return shared_data / "wsi" / f"{SLIDE}.svs"


def tiny_model(out: Path, encoder: str, dim: int = 1024) -> Path:
    """A tiny attention model trained (2 epochs) on random ``dim``-d bags labelled as features of ``encoder``."""
    rng = np.random.default_rng(0)

    def bags(n: int, prefix: str) -> list[FeatureBag]:
        out = []
        for i in range(n):
            y = i % 2
            f = rng.normal(size=(12, dim)).astype(np.float32) + 0.5 * y
            out.append(FeatureBag(f"{prefix}{i}", f, [str(j) for j in range(12)], label=y, attrs={"encoder": encoder}))
        return out

    cfg = TrainConfig(epochs=2, min_epochs=0, model_kwargs={"embed_dim": 16, "attn_dim": 8, "dropout": 0.0})
    train(bags(8, "t"), bags(4, "v"), cfg, out)
    return out / "model.pt"


@pytest.fixture(scope="module")
def uni_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("uni_model"), "uni_v1")  # TRIDENT's name


def run(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def squares(out: Path) -> tuple[np.ndarray, set[int]]:
    """Top-left corners (file order) and side lengths of the GeoJSON squares written into ``out``."""
    geo = json.loads((out / "heatmaps" / f"{SLIDE}_tiles.geojson").read_text())
    rings = [np.asarray(f["geometry"]["coordinates"][0]) for f in geo["features"]]
    sides = {int(r[1, 0] - r[0, 0]) for r in rings} | {int(r[3, 1] - r[0, 1]) for r in rings}
    return np.array([r[0] for r in rings]), sides


def patches(path: Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["coords"][()], dict(f["coords"].attrs)


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of coloured (stained) pixels: saturation above 0.1."""
    t = rgb.astype(np.float64) / 255.0
    return float(((t.max(-1) - t.min(-1)) > 0.1).mean())


# ------------------------------------------------------------------------------------- TRIDENT


def test_trident_10x_heatmap_lands_on_trident_tiles_with_512px_squares(uni_model: Path, cmu: Path, tmp_path: Path) -> None:
    # the model's encoder 'uni_v1' is not one histomil can build: only the cached features are used
    code, output = run("heatmap", uni_model, cmu, "--features", TRIDENT10 / "features_uni_v1", "--out", tmp_path)
    assert code == 0, output
    coords, attrs = patches(TRIDENT10 / "patches" / f"{SLIDE}_patches.h5")
    assert int(attrs["patch_size_level0"]) == 512
    drawn, sides = squares(tmp_path)
    np.testing.assert_array_equal(drawn, coords)
    assert sides == {512}
    with (tmp_path / "predictions.csv").open() as f:
        row = next(csv.DictReader(f))
    assert int(row["n_tiles"]) == len(coords) == 20
    top = {tuple(map(int, t.split("_"))) for t in row["top_tiles"].split(";")}
    assert top <= {tuple(c) for c in coords.tolist()}  # top tiles are level-0 coordinates, not row numbers
    assert (tmp_path / row["heatmap"]).stat().st_size > 1000
    assert not (tmp_path / "features").exists()  # nothing re-extracted
    # the drawn squares hold tissue; the cells of the same 512-px grid that TRIDENT left out do not
    with open_slide(cmu) as slide:
        w, h = slide.dimensions
        inside = [tissue_fraction(slide.read_region((int(x), int(y)), 0, 512)) for x, y in drawn]
        taken = {tuple(c) for c in drawn.tolist()}
        left_out = [tissue_fraction(slide.read_region((x, y), 0, 512))
                    for x in range(0, w - 511, 512) for y in range(0, h - 511, 512) if (x, y) not in taken]
    assert len(left_out) == 4
    assert np.mean(inside) > 0.3 and np.median(inside) > 0.25 and min(inside) > 0.001
    assert max(left_out) < 0.01


def test_without_features_an_unbuildable_encoder_points_to_features(uni_model: Path, cmu: Path, tmp_path: Path) -> None:
    code, output = run("heatmap", uni_model, cmu, "--out", tmp_path)
    assert code == 2 and "pass --features" in output and len(output.strip().splitlines()) == 1


def test_trident_pt_features_take_coordinates_from_patches_file(uni_model: Path, cmu: Path, tmp_path: Path) -> None:
    # .pt files hold no coordinates: --coords at TRIDENT's patches/ (files named <slide>_patches.h5)
    code, output = run("heatmap", uni_model, cmu, "--features", TRIDENT10 / "features_uni_v1_pt",
                       "--coords", TRIDENT10 / "patches", "--out", tmp_path)
    assert code == 0, output
    coords, _ = patches(TRIDENT10 / "patches" / f"{SLIDE}_patches.h5")
    drawn, sides = squares(tmp_path)
    np.testing.assert_array_equal(drawn, coords)
    assert sides == {512}


def test_heatmap_encodes_the_tiles_of_tridents_patches_folder(cmu: Path, tmp_path: Path) -> None:
    # without --features the model's encoder encodes the tiles TRIDENT cut (<slide>_patches.h5)
    from tiny_runs import colour_stats_encoder

    from histomil.slides.predict_slides import predict_slides

    enc = colour_stats_encoder()
    model = tiny_model(tmp_path / "model", enc.info.name, dim=enc.info.dim)
    predict_slides(model, [cmu], tmp_path, coords_dir=TRIDENT10 / "patches", encoder=enc, num_workers=0)
    coords, _ = patches(TRIDENT10 / "patches" / f"{SLIDE}_patches.h5")
    drawn, sides = squares(tmp_path)
    np.testing.assert_array_equal(drawn, coords)
    assert sides == {512}


def test_find_coords_file_knows_trident_names(tmp_path: Path) -> None:
    assert find_coords_file(TRIDENT10 / "patches", SLIDE).name == f"{SLIDE}_patches.h5"
    assert find_coords_file(CLAM / "level0_step256" / "patches", SLIDE).name == f"{SLIDE}.h5"
    with pytest.raises(HistomilError, match="no coordinates file for slide other .*other_patches.h5"):
        find_coords_file(TRIDENT10 / "patches", "other")


def test_features_of_another_encoder_or_slide_are_refused(uni_model: Path, cmu: Path, shared_data: Path,
                                                          tmp_path: Path) -> None:
    conch = INTEROP / "trident" / "20x_256px_0px_overlap" / "features_conch_v1"
    code, output = run("heatmap", uni_model, cmu, "--features", conch, "--out", tmp_path)
    assert code == 2 and "encoder 'conch_v1'" in output and "trained on 'uni_v1'" in output
    assert len(output.strip().splitlines()) == 1
    code, output = run("heatmap", uni_model, cmu, "--features", conch, "--allow-encoder-mismatch", "--out", tmp_path)
    assert code == 0, output
    tcga = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    code, output = run("heatmap", uni_model, tcga, "--features", TRIDENT10 / "features_uni_v1" / f"{SLIDE}.h5",
                       "--out", tmp_path)
    assert code == 2 and f"holds the features of slide {SLIDE}" in output


# ----------------------------------------------------------------------------------------- CLAM


def test_clam_step128_drawn_as_256px_tiles_from_its_patches_file(uni_model: Path, cmu: Path, tmp_path: Path) -> None:
    # h5_files record no tile size; the patches/ folder beside them does (patch_size 256 at level 0)
    code, output = run("predict-slides", uni_model, cmu, "--features", CLAM / "level0_step128", "--out", tmp_path)
    assert code == 0, output
    coords, attrs = patches(CLAM / "level0_step128" / "patches" / f"{SLIDE}.h5")
    assert int(attrs["patch_size"]) == 256 and int(attrs["patch_level"]) == 0
    drawn, sides = squares(tmp_path)
    np.testing.assert_array_equal(drawn, coords)
    assert sides == {256}  # the grid step is 128: the tiles overlap
    assert np.diff(np.unique(coords[:, 1])).min() == 128


def test_clam_h5_alone_needs_coords_or_tile_size(uni_model: Path, cmu: Path, tmp_path: Path) -> None:
    alone = tmp_path / "feats"
    alone.mkdir()
    shutil.copy(CLAM / "level0_step128" / "h5_files" / f"{SLIDE}.h5", alone)
    code, output = run("heatmap", uni_model, cmu, "--features", alone, "--out", tmp_path / "a")
    assert code == 2 and "records no tile size (CLAM h5_files record none)" in output and "--tile-size-level0" in output
    assert len(output.strip().splitlines()) == 1
    code, output = run("heatmap", uni_model, cmu, "--features", alone, "--tile-size-level0", "256", "--out", tmp_path / "b")
    assert code == 0, output
    assert squares(tmp_path / "b")[1] == {256}
    # an explicit size that contradicts the patches file is refused
    code, output = run("heatmap", uni_model, cmu, "--features", alone, "--coords", CLAM / "level0_step128" / "patches",
                       "--tile-size-level0", "128", "--out", tmp_path / "c")
    assert code == 2 and "records tiles of 256 level-0 pixels" in output and "128" in output


def test_clam_level1_tiles_sized_by_level_downsample(uni_model: Path, shared_data: Path, tmp_path: Path) -> None:
    tcga = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    code, output = run("heatmap", uni_model, tcga, "--features", CLAM / "level1_tcga" / "pt_files",
                       "--out", tmp_path)
    assert code == 0, output
    coords, attrs = patches(CLAM / "level1_tcga" / "patches" / "TCGA-CR-7395-01A-01-TS1.h5")
    geo = json.loads((tmp_path / "heatmaps" / "TCGA-CR-7395-01A-01-TS1_tiles.geojson").read_text())
    ring = np.asarray(geo["features"][0]["geometry"]["coordinates"][0])
    assert int(ring[1, 0] - ring[0, 0]) == round(256 * float(attrs["downsample"][0])) == 512
    np.testing.assert_array_equal([np.asarray(f["geometry"]["coordinates"][0][0]) for f in geo["features"]], coords)


# ---------------------------------------------------------------------------------------- STAMP


def test_stamp_v2_micrometres_become_level0_pixels(cmu: Path, tmp_path: Path) -> None:
    feats = STAMP / "tile256um" / "uni-random-49b04e14"
    model = tiny_model(tmp_path / "model", "uni-random")  # the extractor STAMP recorded
    code, output = run("heatmap", model, cmu, "--features", feats, "--out", tmp_path)
    assert code == 0, output
    with h5py.File(feats / f"{SLIDE}.h5", "r") as f:
        um, size_um = f["coords"][()].astype(np.float64), float(f.attrs["tile_size_um"])
    with open_slide(cmu) as slide:
        mpp = slide.mpp
    drawn, sides = squares(tmp_path)
    np.testing.assert_array_equal(drawn, np.rint(um / mpp))
    assert sides == {round(size_um / mpp)} == {513}


def test_stamp_v1_tile_units_drawn_where_v2_micrometres_are(uni_model: Path, cmu: Path, tmp_path: Path) -> None:
    # STAMP v1: no 'unit', coordinates count pixels of 224-px tiles covering 256 um (not micrometres)
    v2 = STAMP / "tile256um" / "uni-random-49b04e14" / f"{SLIDE}.h5"
    v1 = tmp_path / "v1" / f"{SLIDE}.h5"
    v1.parent.mkdir()
    with h5py.File(v2, "r") as f:
        feats, um = f["feats"][()], f["coords"][()].astype(np.float64)
    with h5py.File(v1, "w") as f:
        f["feats"], f["coords"] = feats, um / 256.0 * 224.0
    code, output = run("heatmap", uni_model, cmu, "--features", v1.parent, "--out", tmp_path / "o")
    assert code == 0, output
    with open_slide(cmu) as slide:
        mpp = slide.mpp
    drawn, sides = squares(tmp_path / "o")
    np.testing.assert_allclose(drawn, um / mpp, atol=0.5)
    assert sides == {round(256 / mpp)}


def test_stamp_without_slide_mpp_stops_in_one_line(cmu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(cmu) as slide:
        monkeypatch.setattr(slide, "mpp", None)
        with pytest.raises(HistomilError, match="STAMP coordinates are micrometres.*--slide-mpp"):
            slide_bag_from_features(slide, STAMP / "tile256um" / "uni-random-49b04e14" / f"{SLIDE}.h5")


def test_find_feature_file_in_clam_output_folder() -> None:
    assert find_feature_file(CLAM / "level0_step256", SLIDE) == CLAM / "level0_step256" / "h5_files" / f"{SLIDE}.h5"
    with pytest.raises(HistomilError, match="no feature file for slide nope"):
        find_feature_file(CLAM / "level0_step256", "nope")


def test_predict_slides_skips_a_slide_without_features(uni_model: Path, cmu: Path, shared_data: Path,
                                                       tmp_path: Path) -> None:
    tcga = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    code, output = run("predict-slides", uni_model, cmu, tcga, "--features", TRIDENT10 / "features_uni_v1",
                       "--on-bad-slide", "skip", "--no-heatmaps", "--out", tmp_path / "p.csv")
    assert code == 0, output
    with (tmp_path / "p.csv").open() as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert int(rows[SLIDE]["n_tiles"]) == 20 and rows[SLIDE]["error"] == ""
    assert rows["TCGA-CR-7395-01A-01-TS1"]["prob_positive"] == ""
    assert "no feature file for slide TCGA-CR-7395-01A-01-TS1" in rows["TCGA-CR-7395-01A-01-TS1"]["error"]
    code, output = run("predict-slides", uni_model, cmu, tcga, "--features", TRIDENT10 / "features_uni_v1",
                       "--out", tmp_path / "q")
    assert code == 2 and "no feature file for slide TCGA-CR-7395-01A-01-TS1" in output

"""Every command on the feature files CLAM, TRIDENT and STAMP themselves wrote (../shared/interop),
from the command line: train, evaluate and predict read every layout through one reader and check
every file against the model (issues 12 and 18)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from feature_files import INTEROP, LAYOUTS, copy_layout, invoke, random_bags, train_tiny

from histomil.errors import HistomilError
from histomil.features.formats import load_any_features, load_features_folder
from histomil.features.geometry import require_geometry
from histomil.features.validate import canonical_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

CMU_MPP = 0.499  # CMU-1-Small-Region.svs: level-0 micrometres per pixel (its header)
TRIDENT_20X = INTEROP / "trident" / "20x_256px_0px_overlap"
STAMP_256 = INTEROP / "stamp" / "tile256um" / "uni-random-49b04e14" / "CMU-1-Small-Region.h5"


@pytest.fixture(scope="module")
def uni_model(tmp_path_factory) -> Path:
    """A tiny model trained from the CLI on random 1024-d features named uni_v1 (labels only in labels.csv)."""
    root = tmp_path_factory.mktemp("uni")
    train = random_bags(root / "train", {f"t{i}": i % 2 for i in range(6)}, seed=1)
    val = random_bags(root / "val", {f"v{i}": i % 2 for i in range(4)}, seed=2)
    return train_tiny(train, val, root / "run")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _predict_args(layout: str) -> list[str]:
    return ["--slide-mpp", str(CMU_MPP)] if layout.startswith("stamp") else []


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_trains_evaluates_and_predicts(layout: str, tmp_path: Path) -> None:
    """labels.csv beside the tool's files labels them (no more '2 bags have no label'); predictions
    name tiles by their level-0 coordinates, never by row numbers."""
    feats = copy_layout(layout, tmp_path / "data", {"neg": 0, "pos": 1})
    model = train_tiny(feats, feats, tmp_path / "run")
    info = torch.load(model, map_location="cpu", weights_only=False)["encoder_info"]
    if layout.startswith(("trident", "stamp")):
        assert info["encoder_canonical"] == "uni_v1"  # TRIDENT 'uni_v1' and STAMP 'uni-random' alike
    else:
        assert info is None  # CLAM records no encoder

    result = invoke("evaluate", model, feats, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "eval" / f"predictions_{feats.name}.csv")
    assert {(r["bag_id"], r["y_true"]) for r in rows} == {("neg", "0"), ("pos", "1")}

    result = invoke("predict", model, feats, "--out", tmp_path / "p.csv", "--top-k", 3, *_predict_args(layout))
    assert result.exit_code == 0, result.output
    bag = load_any_features(next(feats.glob("neg.*")), mpp=CMU_MPP)
    known = {f"{x}_{y}" for x, y in bag.coords.tolist()}
    rows = _rows(tmp_path / "p.csv")
    assert [r["bag_id"] for r in rows] == ["neg", "pos"]
    for row in rows:
        tiles = row["top_tiles"].split(";")
        assert len(tiles) == 3 and set(tiles) <= known, tiles
        assert 0.0 <= float(row["prob_positive"]) <= 1.0


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_uni_v1_model_reads_every_uni_layout(layout: str, uni_model: Path, tmp_path: Path) -> None:
    """A model trained on features named uni_v1 takes TRIDENT's uni_v1 and STAMP's uni-random files,
    and CLAM's unnamed ones with one warning naming the assumption."""
    feats = copy_layout(layout, tmp_path / "data", {"a": 1})
    result = invoke("evaluate", uni_model, feats, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert ("record no encoder" in result.stderr) == layout.startswith("clam"), result.stderr
    assert "assuming they were made with the model's encoder 'uni_v1'" in result.stderr or not layout.startswith("clam")
    result = invoke("predict", uni_model, feats, "--out", tmp_path / "p.csv", *_predict_args(layout))
    assert result.exit_code == 0, result.output
    assert len(_rows(tmp_path / "p.csv")) == 1


def test_conch_v1_features_of_the_same_dimension_are_refused(uni_model: Path, tmp_path: Path) -> None:
    conch = TRIDENT_20X / "features_conch_v1"
    for command in (["evaluate", uni_model, _labelled_copy(conch, tmp_path / "c"), "--out", tmp_path / "e"],
                    ["predict", uni_model, conch, "--out", tmp_path / "p.csv"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert "CMU-1-Small-Region.h5" in result.stderr and "'conch_v1'" in result.stderr and "Traceback" not in result.output
        assert "--allow-encoder-mismatch" in result.stderr
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "e" / "metrics.json").exists()
    result = invoke("predict", uni_model, conch, "--out", tmp_path / "p.csv", "--allow-encoder-mismatch")
    assert result.exit_code == 0, result.output
    assert "used anyway" in result.stderr and (tmp_path / "p.csv").is_file()


def _labelled_copy(folder: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    (dest / "labels.csv").write_text("case,y_true\nCMU-1-Small-Region,1\n")
    return dest


def test_float16_files_are_read_as_float32() -> None:
    h5 = TRIDENT_20X / "features_uni_v1" / "CMU-1-Small-Region.h5"
    with h5py.File(h5) as f:
        stored = f["features"][()]
    assert stored.dtype == np.float16
    for path in (h5, INTEROP / "trident" / "10x_256px_0px_overlap" / "features_uni_v1_pt" / "CMU-1-Small-Region.pt",
                 STAMP_256):
        bag = load_any_features(path, mpp=CMU_MPP)
        assert bag.features.dtype == np.float32 and bag.attrs["stored_dtype"] == "float16"
    np.testing.assert_array_equal(load_any_features(h5).features, stored.astype(np.float32))


def test_stamp_v1_coordinates_are_224_px_tiles_of_256_um(tmp_path: Path) -> None:
    """STAMP v1 (no 'unit') stores pixels of 224-px tiles covering 256 um: read as micrometres they
    would land 224/256 of the way to their tiles."""
    v2 = load_any_features(STAMP_256, mpp=CMU_MPP)
    v1 = tmp_path / "CMU-1-Small-Region.h5"
    with h5py.File(STAMP_256) as src, h5py.File(v1, "w") as dst:
        dst["feats"] = src["feats"][()]
        dst["coords"] = (src["coords"][()] * (224 / 256)).astype(np.float32)  # v1: 224 px per 256 um
        dst["augmented"] = np.zeros(len(src["coords"]), dtype=bool)
        dst.attrs["extractor"] = "mahmood-uni-56ef09b4"
    bag = load_any_features(v1, mpp=CMU_MPP)
    assert bag.attrs["stamp_layout"] == "v1" and bag.attrs["encoder_canonical"] == "uni_v1"
    np.testing.assert_allclose(bag.coords, v2.coords, atol=1)
    assert bag.attrs["patch_size_level0"] == round(256 / CMU_MPP) == v2.attrs["patch_size_level0"]
    # v2 reads micrometres: 256.486 um at 0.499 um/px is level-0 pixel 514
    assert v2.coords[:, 0].max() > 0 and (v2.coords[0] == [514, 0]).all()


def test_stamp_needs_the_slide_resolution() -> None:
    bag = load_any_features(STAMP_256)
    assert bag.coords is None
    with pytest.raises(HistomilError, match=r"CMU-1-Small-Region\.h5: no level-0 coordinates.*--slide-mpp"):
        require_geometry(bag)


def test_clam_tile_sizes_come_from_its_patches_files() -> None:
    """CLAM's h5_files record no tile size; its patches files do (step-128 tiles stay 256 px wide;
    level-1 tiles of 256 px are 512 level-0 px)."""
    step128 = load_any_features(INTEROP / "clam" / "level0_step128" / "h5_files" / "CMU-1-Small-Region.h5")
    coords, size = require_geometry(step128)
    assert size == 256 and np.diff(np.unique(coords[:, 1])).min() == 128
    pt = load_any_features(INTEROP / "clam" / "level0_step128" / "pt_files" / "CMU-1-Small-Region.pt")
    np.testing.assert_array_equal(require_geometry(pt)[0], coords)
    assert require_geometry(pt)[1] == 256 and pt.tile_paths[1] == "320_966"
    level1 = load_any_features(INTEROP / "clam" / "level1_tcga" / "h5_files" / "TCGA-CR-7395-01A-01-TS1.h5")
    assert require_geometry(level1)[1] == 512
    tri = load_any_features(INTEROP / "trident" / "10x_256px_0px_overlap" / "features_uni_v1_pt" / "CMU-1-Small-Region.pt")
    assert require_geometry(tri)[1] == 512 and tri.attrs["encoder_canonical"] == "uni_v1"


def test_missing_tile_size_is_asked_for_never_guessed(tmp_path: Path) -> None:
    src = INTEROP / "clam" / "level0_step256"
    lone = tmp_path / "h5_files" / "s.h5"
    lone.parent.mkdir()
    lone.write_bytes((src / "h5_files" / "CMU-1-Small-Region.h5").read_bytes())
    bag = load_any_features(lone)
    assert bag.coords is not None and "patch_size_level0" not in bag.attrs
    with pytest.raises(HistomilError, match=r"s\.h5: no level-0 tile size.*--tile-size"):
        require_geometry(bag)
    assert require_geometry(load_any_features(lone, tile_size=256))[1] == 256
    patches = tmp_path / "coords"
    patches.mkdir()
    (patches / "s.h5").write_bytes((src / "patches" / "CMU-1-Small-Region.h5").read_bytes())
    assert require_geometry(load_any_features(lone, coords_dir=patches))[1] == 256
    with pytest.raises(HistomilError, match="records tiles of 256 level-0 pixels, --tile-size-level0 says 512"):
        load_any_features(lone, coords_dir=patches, tile_size=512)
    other = tmp_path / "other"
    other.mkdir()
    (other / "s.h5").write_bytes((INTEROP / "clam" / "level0_step128" / "patches" / "CMU-1-Small-Region.h5").read_bytes())
    with pytest.raises(HistomilError, match=r"other/s\.h5: holds 201 coordinates for the 50 feature rows"):
        load_any_features(lone, coords_dir=other)
    pt = tmp_path / "pt_files" / "s.pt"
    pt.parent.mkdir()
    pt.write_bytes((src / "pt_files" / "CMU-1-Small-Region.pt").read_bytes())
    with pytest.raises(HistomilError, match=r"s\.pt: no level-0 coordinates.*--coords"):
        require_geometry(load_any_features(pt))


def test_labels_csv_and_stored_labels_must_agree(tmp_path: Path) -> None:
    folder = random_bags(tmp_path / "f", {"a": 0, "b": 1})
    from histomil.features.store import read_feature_bag, write_feature_bag

    bag = read_feature_bag(folder / "a.h5")
    bag.label = 1
    write_feature_bag(folder / "a.h5", bag)
    with pytest.raises(HistomilError, match=r"a\.h5: stores label 1, .*labels\.csv says 0"):
        load_features_folder(folder)


def test_encoder_names_map_across_tools() -> None:
    assert {canonical_encoder(n) for n in ("uni_v1", "uni", "UNI", "uni-random", "mahmood-uni-56ef09b4")} == {"uni_v1"}
    assert canonical_encoder("conch_v1") == canonical_encoder("conch") == "conch_v1"
    assert canonical_encoder("conch_v2") == "conch_v2"  # a version tag is not a variant of conch_v1
    assert canonical_encoder("uni2-h") == "uni_v2" != canonical_encoder("uni")
    assert canonical_encoder("resnet50") == canonical_encoder("resnet50_trunc")
    assert canonical_encoder("efficientnet_lite0") == "efficientnet_lite0"
    assert canonical_encoder(None) is None and canonical_encoder("unknown") is None


def test_checkpoint_records_the_canonical_encoder(uni_model: Path) -> None:
    info = torch.load(uni_model, map_location="cpu", weights_only=False)["encoder_info"]
    assert info["name"] == "uni_v1" and info["encoder_canonical"] == "uni_v1"
    assert json.dumps(info)  # plain values only

"""Feature files of other tools (CLAM, TRIDENT, STAMP, torch .pt) read as bags."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histomil.errors import HistomilError
from histomil.features.formats import (
    detect_format,
    feature_files_any,
    load_any_features,
    load_features_folder,
)
from histomil.features.store import FeatureBag, write_feature_bag

RNG = np.random.default_rng(0)


def feats(n: int = 7, d: int = 16) -> np.ndarray:
    return RNG.normal(size=(n, d)).astype(np.float32)


def grid(n: int = 7, step: int = 512) -> np.ndarray:
    return np.array([[step * (i % 3), step * (i // 3)] for i in range(n)], dtype=np.int64)


def write_clam(path: Path, f: np.ndarray, c: np.ndarray | None, attrs: dict | None = None) -> Path:
    with h5py.File(path, "w") as h:
        h.create_dataset("features", data=f)
        if c is not None:
            ds = h.create_dataset("coords", data=c)
            for k, v in (attrs or {}).items():
                ds.attrs[k] = v
    return path


def write_trident(path: Path, f: np.ndarray, c: np.ndarray) -> Path:
    with h5py.File(path, "w") as h:
        fd = h.create_dataset("features", data=f)
        fd.attrs.update({"name": path.stem, "savetodir": str(path.parent), "encoder": "uni_v1"})
        cd = h.create_dataset("coords", data=c)
        cd.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                         "target_magnification": 20, "overlap": 0, "name": path.stem,
                         "level0_width": 4096, "level0_height": 4096})
    return path


def write_stamp(path: Path, f: np.ndarray, c_um: np.ndarray, unit: str | None = "um") -> Path:
    with h5py.File(path, "w") as h:
        h["feats"] = f.astype(np.float16)
        h["coords"] = c_um.astype(np.float32)
        h.attrs["extractor"] = "ctranspath"
        h.attrs["tile_size_um"] = 256.0
        h.attrs["tile_size_px"] = 224
        h.attrs["feat_type"] = "tile"
        if unit is not None:
            h.attrs["unit"] = unit
    return path


# ------------------------------------------------------------------------------ single files


def test_clam_h5_round_trip(tmp_path: Path) -> None:
    f, c = feats(), grid()
    p = write_clam(tmp_path / "slide_a.h5", f, c, {"patch_size": 256, "patch_level": 1})
    assert detect_format(p) == "clam"
    bag = load_any_features(p)
    assert bag.bag_id == "slide_a" and bag.label is None
    np.testing.assert_array_equal(bag.features, f)
    np.testing.assert_array_equal(bag.coords, c)
    assert bag.tile_paths[1] == "512_0"
    assert bag.attrs["source_format"] == "clam"
    assert bag.attrs["patch_size"] == 256 and bag.attrs["patch_level"] == 1


def test_clam_features_without_coords_and_leading_axis(tmp_path: Path) -> None:
    f = feats(5, 8)
    p = write_clam(tmp_path / "s.h5", f[None], None)  # (1, N, D) as some scripts save
    bag = load_any_features(p, label=1)
    assert bag.features.shape == (5, 8) and bag.coords is None and bag.label == 1
    assert bag.tile_paths == ["0", "1", "2", "3", "4"]


def test_clam_pt_tensor_and_numpy_and_dict(tmp_path: Path) -> None:
    f = feats(6, 12)
    torch.save(torch.from_numpy(f).half(), tmp_path / "a.pt")
    torch.save(f, tmp_path / "b.pt")  # TRIDENT may save a numpy array
    torch.save({"features": torch.from_numpy(f), "coords": torch.from_numpy(grid(6))}, tmp_path / "c.pth")
    a, b, c = (load_any_features(tmp_path / n) for n in ("a.pt", "b.pt", "c.pth"))
    np.testing.assert_allclose(a.features, f, atol=2e-3)  # stored as float16
    assert a.features.dtype == np.float32 and a.coords is None and a.attrs["source_format"] == "pt"
    np.testing.assert_array_equal(b.features, f)
    np.testing.assert_array_equal(c.coords, grid(6))
    assert detect_format(tmp_path / "a.pt") == "pt"


def test_pt_refuses_arbitrary_objects(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(3)}, tmp_path / "w.pt")
    with pytest.raises(HistomilError, match=r"w\.pt.*without 'features'.*weights"):
        load_any_features(tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(HistomilError, match=r"junk\.pt: not a readable torch feature file"):
        load_any_features(tmp_path / "junk.pt")


def test_trident_h5(tmp_path: Path) -> None:
    f, c = feats(), grid()
    p = write_trident(tmp_path / "TCGA-1.h5", f, c)
    assert detect_format(p) == "trident"
    bag = load_any_features(p)
    np.testing.assert_array_equal(bag.features, f)
    np.testing.assert_array_equal(bag.coords, c)
    assert bag.attrs["encoder"] == "uni_v1"
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["target_magnification"] == 20
    assert bag.attrs["slide_name"] == "TCGA-1"


def test_stamp_micrometres_become_level0_pixels_with_mpp(tmp_path: Path) -> None:
    f = feats()
    px = grid(7, step=512)
    um = px * 0.25  # a 0.25 um/px scan
    p = write_stamp(tmp_path / "st.h5", f, um)
    assert detect_format(p) == "stamp"
    bag = load_any_features(p, mpp=0.25)
    np.testing.assert_allclose(bag.features, f, atol=2e-3)
    np.testing.assert_array_equal(bag.coords, px)
    assert bag.attrs["encoder"] == "ctranspath"
    assert bag.attrs["patch_size_level0"] == 1024  # 256 um / 0.25 um/px
    assert bag.tile_paths[4] == "512_512"
    # without the resolution, no coordinates rather than micrometres posing as pixels
    bag = load_any_features(p)
    assert bag.coords is None and "micrometres" in bag.attrs["coords_missing"]
    # pixel-unit STAMP files (its multiplex path) keep their coordinates as they are
    bag = load_any_features(write_stamp(tmp_path / "px.h5", f, px.astype(np.float32), unit="px"))
    np.testing.assert_array_equal(bag.coords, px)
    # STAMP v1 (no 'unit'): pixels of 224-px tiles covering 256 um (tests/test_interop_cli.py checks more)
    v1 = grid(7, step=224).astype(np.float32)
    bag = load_any_features(write_stamp(tmp_path / "old.h5", f, v1, unit=None), mpp=0.5)
    np.testing.assert_array_equal(bag.coords, grid(7, step=512))  # a 224-px step is 256 um, 512 px at 0.5 um/px


def test_histomil_files_read_as_themselves(tmp_path: Path) -> None:
    f = feats()
    bag = FeatureBag("b1", f, [f"t{i}.jpg" for i in range(7)], label=1, coords=grid(),
                     attrs={"encoder": "efficientnet_lite0", "input_size": 224})
    write_feature_bag(tmp_path / "b1.h5", bag)
    assert detect_format(tmp_path / "b1.h5") == "histomil"
    back = load_any_features(tmp_path / "b1.h5")
    np.testing.assert_array_equal(back.features, f)
    np.testing.assert_array_equal(back.coords, grid())
    assert back.label == 1 and back.tile_paths == bag.tile_paths and back.attrs["encoder"] == "efficientnet_lite0"
    assert load_any_features(tmp_path / "b1.h5", label=0).label == 0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda h: h.create_dataset("embeddings", data=np.ones((3, 4))), r"unknown feature layout.*embeddings \(3, 4\)"),
        (lambda h: h.create_dataset("features", data=np.ones(768)), r"slide embedding"),
        (lambda h: h.create_dataset("features", data=np.full((2, 3), np.nan)), r"NaN or infinite values in 2 of 2"),
        (lambda h: (h.create_dataset("features", data=np.ones((3, 4))), h.create_dataset("coords", data=np.ones((2, 2)))),
         r"'coords' has shape \(2, 2\); expected \(3, 2\)"),
        (lambda h: h.create_dataset("features", data=np.ones((0, 4))), r"at least one tile"),
        (lambda h: h.create_dataset("features", data=np.array([[b"a", b"b"]])), r"not real numbers"),
    ],
)
def test_bad_layouts_are_one_line_errors_naming_the_file(tmp_path: Path, build, message: str) -> None:
    p = tmp_path / "bad.h5"
    with h5py.File(p, "w") as h:
        build(h)
    with pytest.raises(HistomilError, match=message) as info:
        load_any_features(p)
    assert str(info.value).startswith(str(p)) and "\n" not in str(info.value)


def test_not_hdf5_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(HistomilError, match=r"x\.h5: not a readable HDF5"):
        load_any_features(tmp_path / "x.h5")
    with pytest.raises(HistomilError, match="not found"):
        load_any_features(tmp_path / "nope.h5")
    with pytest.raises(HistomilError, match="positive number"):
        load_any_features(tmp_path / "x.h5", mpp=-1)


# ------------------------------------------------------------------------------------- folders


def test_folder_of_mixed_files_with_labels(tmp_path: Path) -> None:
    f1, f2, f3 = feats(4), feats(6), feats(3)
    write_clam(tmp_path / "case10.h5", f1, grid(4))
    torch.save(torch.from_numpy(f2), tmp_path / "case2.pt")
    write_stamp(tmp_path / "case3.h5", f3, grid(3) * 0.5)
    (tmp_path / "labels.csv").write_text("case,y_true\ncase10,1\ncase2,0\ncase3,1\n")
    bags = load_features_folder(tmp_path, mpp=0.5)
    assert [b.bag_id for b in bags] == ["case2", "case3", "case10"]  # natural order
    assert [b.label for b in bags] == [0, 1, 1]
    assert [len(b) for b in bags] == [6, 3, 4]
    np.testing.assert_array_equal(bags[1].coords, grid(3))
    assert [b.attrs["source_format"] for b in bags] == ["pt", "stamp", "clam"]


def test_folder_label_problems(tmp_path: Path) -> None:
    write_clam(tmp_path / "a.h5", feats(3), None)
    write_clam(tmp_path / "b.h5", feats(3), None)
    with pytest.raises(HistomilError, match=r"2 feature file\(s\) have no label: a, b"):
        load_features_folder(tmp_path)
    assert [b.label for b in load_features_folder(tmp_path, require_labels=False)] == [None, None]
    csv = tmp_path / "y.csv"
    csv.write_text("case,y_true\na,1\n")
    with pytest.raises(HistomilError, match=r"1 feature file\(s\) have no label: b"):
        load_features_folder(tmp_path, csv)
    csv.write_text("case,y_true\na,1\nb,0\nzz,1\n")
    with pytest.raises(HistomilError, match=r"y\.csv: 1 case\(s\) have no feature file.*zz"):
        load_features_folder(tmp_path, csv)


def test_folder_refuses_mixed_dimensions(tmp_path: Path) -> None:
    write_clam(tmp_path / "a.h5", feats(3, 16), None)
    write_clam(tmp_path / "b.h5", feats(3, 32), None)
    with pytest.raises(HistomilError, match=r"b\.h5: 32-d features, but .*a\.h5 has 16-d"):
        load_features_folder(tmp_path, require_labels=False)


def test_clam_output_folder_prefers_h5_files(tmp_path: Path) -> None:
    (tmp_path / "h5_files").mkdir()
    (tmp_path / "pt_files").mkdir()
    f = feats(5)
    write_clam(tmp_path / "h5_files" / "s1.h5", f, grid(5))
    torch.save(torch.from_numpy(f), tmp_path / "pt_files" / "s1.pt")
    files = feature_files_any(tmp_path)
    assert files == [tmp_path / "h5_files" / "s1.h5"]
    # one case as both .h5 and .pt in the same folder: the h5 (which has coordinates) wins
    torch.save(torch.from_numpy(f), tmp_path / "h5_files" / "s1.pt")
    assert feature_files_any(tmp_path / "h5_files") == [tmp_path / "h5_files" / "s1.h5"]
    with pytest.raises(HistomilError, match="no feature files"):
        (tmp_path / "empty").mkdir()
        feature_files_any(tmp_path / "empty")

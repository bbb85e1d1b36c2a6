"""Exports for CLAM, TRIDENT and STAMP: the same datasets, dtypes and attributes (with the same meanings)
as the files those tools wrote for the same slide and tiling (../shared/interop), and histomil reads its
own exports back unchanged."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from slide_fixtures import make_slide
from tiny_runs import FAST_ENCODER, colour_stats_encoder
from typer.testing import CliRunner

from histomil.cli import app
from histomil.errors import HistomilError
from histomil.features.export import export_features, export_slide_features, read_slide_features
from histomil.features.formats import load_any_features
from histomil.slides import TilingSpec
from histomil.slides.features import extract_slide_features

INTEROP = Path(__file__).resolve().parents[1].parent / "shared" / "interop"
SLIDE = "CMU-1-Small-Region"
MASK = 1024  # a small overview keeps tissue detection fast


def h5_layout(path: Path) -> dict[str, tuple[str, set[str]]]:
    """dataset -> (dtype, attribute names), plus '/' -> ('', file attribute names)."""
    out: dict[str, tuple[str, set[str]]] = {}
    with h5py.File(path, "r") as f:
        out["/"] = ("", set(f.attrs.keys()))
        f.visititems(lambda n, o: out.__setitem__(n, (str(o.dtype), set(o.attrs.keys())))
                     if isinstance(o, h5py.Dataset) else None)
    return out


def attrs(path: Path, key: str = "coords") -> dict:
    with h5py.File(path, "r") as f:
        return dict(f[key].attrs) if key != "/" else dict(f.attrs)


def no_nan_attributes(path: Path) -> bool:
    found: list[str] = []
    with h5py.File(path, "r") as f:
        for obj in [f, *(f[k] for k in f.keys())]:
            for k, v in obj.attrs.items():
                a = np.asarray(v)
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    found.append(k)
    return not found


@pytest.fixture(scope="module")
def extracted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """histomil slide feature files of CMU-1-Small-Region at the tilings the interop tools used."""
    slide = shared_data / "wsi" / f"{SLIDE}.svs"
    root = tmp_path_factory.mktemp("histomil")
    specs = {
        "20x256": TilingSpec(tile_size=256, magnification=20, mask_size=MASK),  # CLAM level0_step256, TRIDENT 20x
        "10x256": TilingSpec(tile_size=256, magnification=10, mask_size=MASK),  # TRIDENT 10x_256px
        "256um": TilingSpec(tile_size=224, mpp=256 / 224, mask_size=MASK),  # STAMP tile256um: 256 um in 224 px
    }
    enc = colour_stats_encoder()
    return {k: extract_slide_features([slide], root / k, enc, spec, num_workers=0).files[SLIDE] for k, spec in specs.items()}


# ---------------------------------------------------------------------------------------- CLAM


def test_clam_export_has_clams_datasets_dtypes_and_attributes(extracted: dict[str, Path], tmp_path: Path) -> None:
    real = INTEROP / "clam" / "level0_step256"
    written = export_slide_features(extracted["20x256"], tmp_path, "clam")
    h5, pt, patches = (tmp_path / "h5_files" / f"{SLIDE}.h5", tmp_path / "pt_files" / f"{SLIDE}.pt",
                       tmp_path / "patches" / f"{SLIDE}.h5")
    assert written == [h5, pt, patches]
    assert h5_layout(h5) == h5_layout(real / "h5_files" / f"{SLIDE}.h5")  # features float32, coords int32, no attrs
    assert h5_layout(patches) == h5_layout(real / "patches" / f"{SLIDE}.h5")
    ours, theirs = attrs(patches), attrs(real / "patches" / f"{SLIDE}.h5")
    for key in ("patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)  # same slide, same 256-px level-0 tiles
        assert np.asarray(ours[key]).dtype.kind == np.asarray(theirs[key]).dtype.kind, key
    tensor, real_tensor = torch.load(pt, weights_only=True), torch.load(real / "pt_files" / f"{SLIDE}.pt", weights_only=True)
    assert type(tensor) is type(real_tensor) and tensor.dtype == real_tensor.dtype == torch.float32
    # histomil reads its export back unchanged (tile size from the patches file beside h5_files)
    src = load_any_features(extracted["20x256"])
    back = load_any_features(h5)
    np.testing.assert_array_equal(back.features, src.features)
    np.testing.assert_array_equal(back.coords, src.coords)
    assert back.attrs["patch_size_level0"] == src.attrs["patch_size_level0"] == 256
    from_pt = load_any_features(pt)
    np.testing.assert_array_equal(from_pt.features, src.features)
    np.testing.assert_array_equal(from_pt.coords, src.coords)
    assert from_pt.attrs["patch_size_level0"] == 256


# -------------------------------------------------------------------------------------- TRIDENT


def test_trident_export_has_tridents_attributes_and_meanings(extracted: dict[str, Path], tmp_path: Path) -> None:
    real = INTEROP / "trident" / "10x_256px_0px_overlap"
    export_slide_features(extracted["10x256"], tmp_path, "trident")
    patches = tmp_path / "patches" / f"{SLIDE}_patches.h5"
    feats = tmp_path / f"features_{FAST_ENCODER}" / f"{SLIDE}.h5"
    real_patches, real_feats = real / "patches" / f"{SLIDE}_patches.h5", real / "features_uni_v1" / f"{SLIDE}.h5"
    assert h5_layout(patches) == h5_layout(real_patches)
    ours_layout, theirs_layout = h5_layout(feats), h5_layout(real_feats)
    assert ours_layout.keys() == theirs_layout.keys()
    assert {k: v[1] for k, v in ours_layout.items()} == {k: v[1] for k, v in theirs_layout.items()}
    assert ours_layout["features"][0] == "float32"  # TRIDENT writes float16 only for half-precision encoders
    ours, theirs = attrs(patches), attrs(real_patches)
    # the same slide cut into 256-px tiles at 10x: TRIDENT's meanings (patch_size at the target magnification)
    for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                "level0_width", "level0_height", "name"):
        assert ours[key] == theirs[key], key
        assert np.asarray(ours[key]).dtype.kind == np.asarray(theirs[key]).dtype.kind, key
    assert ours["patch_size"] == 256 and ours["patch_size_level0"] == 512
    assert attrs(feats, "features")["encoder"] == FAST_ENCODER
    assert all(no_nan_attributes(p) for p in (patches, feats))
    src = load_any_features(extracted["10x256"])
    back = load_any_features(feats)
    assert back.attrs["source_format"] == "trident" and back.attrs["encoder"] == FAST_ENCODER
    np.testing.assert_array_equal(back.features, src.features)
    np.testing.assert_array_equal(back.coords, src.coords)
    assert back.attrs["patch_size_level0"] == src.attrs["patch_size_level0"] == 512


# ---------------------------------------------------------------------------------------- STAMP


def test_stamp_export_has_stamps_datasets_units_and_attributes(extracted: dict[str, Path], shared_data: Path,
                                                               tmp_path: Path) -> None:
    real = INTEROP / "stamp" / "tile256um" / "uni-random-49b04e14" / f"{SLIDE}.h5"
    (out,) = export_slide_features(extracted["256um"], tmp_path, "stamp")
    ours_layout, theirs_layout = h5_layout(out), h5_layout(real)
    assert {k: v[0] for k, v in ours_layout.items()} == {k: v[0] for k, v in theirs_layout.items()}  # float16, float32
    assert ours_layout["/"][1] == theirs_layout["/"][1] - {"code_hash"}  # a hash of STAMP's own code
    ours, theirs = attrs(out, "/"), attrs(real, "/")
    assert ours["unit"] == theirs["unit"] == "um" and ours["feat_type"] == theirs["feat_type"] == "tile"
    assert ours["tile_size_px"] == theirs["tile_size_px"] == 224
    _, tiling = read_slide_features(extracted["256um"])
    mpp = tiling.slide_mpp
    assert mpp == pytest.approx(0.499)
    assert abs(float(ours["tile_size_um"]) - float(theirs["tile_size_um"])) <= mpp  # 513 px of 0.499 um vs 256 um
    for key in ("tile_size_um", "tile_size_px", "stamp_version"):
        assert np.asarray(ours[key]).dtype.kind == np.asarray(theirs[key]).dtype.kind, key
    assert ours["extractor"] == FAST_ENCODER
    src = load_any_features(extracted["256um"])
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["coords"][()], src.coords * mpp, rtol=1e-6)  # top-left corners in um
    back = load_any_features(out, mpp=mpp)
    np.testing.assert_array_equal(back.coords, src.coords)
    assert back.attrs["patch_size_level0"] == src.attrs["patch_size_level0"] == 513
    np.testing.assert_array_equal(back.features, src.features.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------------- missing facts


def test_export_refuses_missing_facts_and_never_writes_nan(extracted: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "src" / f"{SLIDE}.h5"
    bare.parent.mkdir()
    shutil.copy(extracted["10x256"], bare)
    with h5py.File(bare, "r+") as f:  # as if the slide header had neither um/px nor objective power
        for key in ("slide_mpp", "target_mpp", "level0_magnification", "target_magnification"):
            del f["coords"].attrs[key]
    with pytest.raises(HistomilError, match="no micrometres per pixel.*--slide-mpp"):
        export_slide_features(bare, tmp_path / "s", "stamp")
    with pytest.raises(HistomilError, match="no objective power.*--slide-magnification"):
        export_slide_features(bare, tmp_path / "t", "trident")
    with pytest.raises(HistomilError, match="records a slide resolution of 0.499, --slide-mpp says 0.25"):
        export_slide_features(extracted["10x256"], tmp_path / "u", "stamp", slide_mpp=0.25)
    written = export_slide_features(bare, tmp_path / "t", "trident", slide_magnification=20)
    written += export_slide_features(bare, tmp_path / "s", "stamp", slide_mpp=0.499)
    written += export_slide_features(bare, tmp_path / "c", "clam")
    assert all(no_nan_attributes(p) for p in written if p.suffix == ".h5")
    assert attrs(tmp_path / "t" / "patches" / f"{SLIDE}_patches.h5")["target_magnification"] == 10


def test_histomil_slide_files_never_hold_nan(tmp_path: Path) -> None:
    # the synthetic slide records um/px but no objective power: the magnifications are left out, not NaN
    slide = make_slide(tmp_path)
    spec = TilingSpec(tile_size=64, mpp=1.0, mask_size=512)
    path = extract_slide_features([slide], tmp_path / "f", colour_stats_encoder(), spec, num_workers=0).files["synthetic"]
    assert no_nan_attributes(path)
    a = attrs(path)
    assert "level0_magnification" not in a and "target_magnification" not in a
    assert a["slide_mpp"] == pytest.approx(0.25) and not math.isnan(a["target_mpp"])


def test_only_histomil_slide_files_are_exported(tmp_path: Path) -> None:
    real = INTEROP / "trident" / "10x_256px_0px_overlap" / "features_uni_v1" / f"{SLIDE}.h5"
    with pytest.raises(HistomilError, match="not a histomil slide feature file.*trident"):
        export_features([real], tmp_path, "trident")
    with pytest.raises(HistomilError, match="layout must be one of clam, trident, stamp"):
        export_features([real], tmp_path, "qupath")


# -------------------------------------------------------------------------------------- commands


@pytest.mark.usefixtures("fast_encoder")
def test_commands_export_and_write_layouts(extracted: dict[str, Path], shared_data: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["features", "export", str(extracted["10x256"].parent), "--layout", "trident",
                                 "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t" / f"features_{FAST_ENCODER}" / f"{SLIDE}.h5").is_file()
    r = CliRunner().invoke(app, ["features", "export", str(extracted["10x256"]), "--layout", "tiff",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--layout must be one of clam, trident, stamp" in r.output
    src = extracted["10x256"].parent
    r = CliRunner().invoke(app, ["features", "export", str(src), "--layout", "stamp", "--out", str(src)])
    assert r.exit_code == 2 and "STAMP files of the same names would replace them" in r.output
    r = CliRunner().invoke(app, ["features", "slides", str(shared_data / "wsi" / f"{SLIDE}.svs"), "--out", str(tmp_path / "s"),
                                 "--encoder", FAST_ENCODER, "--precision", "fp32", "--runtime", "torch", "--workers", "0",
                                 "--magnification", "5", "--tile-size", "224", "--layout", "stamp"])
    assert r.exit_code == 0, r.output
    own, stamp = tmp_path / "s" / "histomil" / f"{SLIDE}.h5", tmp_path / "s" / f"{SLIDE}.h5"
    assert load_any_features(own).attrs["source_format"] == "histomil"
    back, src = load_any_features(stamp, mpp=0.499), load_any_features(own)
    assert back.attrs["source_format"] == "stamp"
    np.testing.assert_array_equal(back.coords, src.coords)

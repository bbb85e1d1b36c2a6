"""CPU runtimes for the tile encoder: OpenVINO / ONNX Runtime match torch fp32, ``auto`` resolves as
documented, and the runtime used is recorded in feature files and the cache identity."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histomil.data.bags import Bag
from histomil.errors import HistomilError
from histomil.features import runtimes
from histomil.features.cache import FeatureCache
from histomil.features.encoders import build_encoder
from histomil.features.extract import extract_bags
from histomil.features.runtimes import FEATURE_TOLERANCE, resolve_runtime, runtime_of, with_runtime
from histomil.features.store import read_feature_bag

ALTERNATIVES = ["openvino", "onnxruntime"]


def _tile_paths(ebhi_table: Path, n: int) -> list[Path]:
    """``n`` real EBHI tiles, one per tissue class first, then the next rows."""
    with open(ebhi_table, newline="") as f:
        rows = list(csv.DictReader(f))
    picked: dict[str, str] = {}
    for row in rows:
        picked.setdefault(row["tissue"], row["path"])
    paths = list(dict.fromkeys([*picked.values(), *(r["path"] for r in rows)]))[:n]
    return [ebhi_table.parent / p for p in paths]


@pytest.fixture(scope="module")
def tile_files(ebhi_table: Path) -> list[Path]:
    return _tile_paths(ebhi_table, 6)


@pytest.fixture(scope="module")
def real_tiles(tile_files: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in tile_files])


@pytest.fixture(scope="module")
def torch_features(real_tiles: np.ndarray) -> np.ndarray:
    return build_encoder("efficientnet_lite0", precision="fp32", channels_last=False).encode(real_tiles)


def _skip_unless_installed(runtime: str) -> None:
    if not runtimes.runtime_installed(runtime):
        pytest.skip(f"{runtime} is not installed")


@pytest.fixture(scope="module")
def alt_encoders() -> dict:
    built: dict = {}

    def get(runtime: str):
        _skip_unless_installed(runtime)
        if runtime not in built:
            built[runtime] = with_runtime(build_encoder("efficientnet_lite0", precision="fp32", channels_last=True), runtime)
        return built[runtime]

    return get  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ agreement


@pytest.mark.parametrize("runtime", ALTERNATIVES)
def test_runtime_features_match_torch_fp32_on_real_tiles(runtime, alt_encoders, real_tiles, torch_features):
    enc = alt_encoders(runtime)
    assert runtime_of(enc) == runtime and enc.precision == "fp32"
    assert enc.info == build_encoder("efficientnet_lite0", pretrained=False, precision="fp32").info
    # batch 4 over 6 tiles: a batch of 4 then one of 2 (the converted graph takes any batch size)
    feats = enc.encode(real_tiles, batch_size=4)
    assert feats.shape == torch_features.shape and feats.dtype == np.float32
    scale = float(np.abs(torch_features).max())
    assert scale > 1.0  # real features, not zeros
    assert float(np.abs(feats - torch_features).max()) <= FEATURE_TOLERANCE * scale
    np.testing.assert_allclose(enc.encode(real_tiles[2]), feats[2:3], rtol=0, atol=FEATURE_TOLERANCE * scale)  # one HWC tile


@pytest.mark.parametrize("runtime", ALTERNATIVES)
def test_runtime_encoder_interface(runtime, alt_encoders, real_tiles):
    enc = alt_encoders(runtime)
    x = enc.preprocess(real_tiles[:2])
    assert x.shape == (2, 3, 224, 224) and x.is_contiguous()
    assert tuple(enc(x).shape) == (2, 1280)
    assert enc.encode(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 1280)
    with pytest.raises(HistomilError, match="batch size"):
        enc.encode(real_tiles, batch_size=0)
    attrs = enc.feature_attrs()
    assert attrs["runtime"] == runtime and attrs["precision"] == "fp32" and attrs["encoder"] == "efficientnet_lite0"


# ------------------------------------------------------------------------------------ resolution


@pytest.mark.parametrize("installed", [True, False])
def test_auto_picks_the_alternative_runtime_for_fp32_on_cpu_only_when_installed(monkeypatch, installed):
    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: installed or name == "torch")
    assert resolve_runtime("auto", "fp32", "cpu") == (runtimes.AUTO_RUNTIME if installed else "torch")
    assert resolve_runtime("auto", "bf16", "cpu") == "torch"  # bf16 stays with torch's autocast
    assert resolve_runtime("auto", "fp32", "cuda") == "torch"
    assert resolve_runtime("torch", "fp32", "cpu") == "torch"


def test_auto_with_bf16_or_not_installed_returns_the_torch_encoder_itself(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on hardware that emulates it warns
        bf16 = build_encoder("efficientnet_lite0", pretrained=False, precision="bf16")
    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: True)
    assert with_runtime(bf16, "auto") is bf16 and runtime_of(bf16) == "torch"
    fp32 = build_encoder("efficientnet_lite0", pretrained=False, precision="fp32")
    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: name == "torch")
    assert with_runtime(fp32, "auto") is fp32
    assert fp32.feature_attrs()["runtime"] == "torch"


def test_explicit_runtime_that_cannot_serve_is_an_error(monkeypatch):
    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: name != "openvino")
    with pytest.raises(HistomilError, match="openvino is not installed.*pip install"):
        resolve_runtime("openvino", "fp32", "cpu")
    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: True)
    with pytest.raises(HistomilError, match="fp32 only"):
        resolve_runtime("openvino", "bf16", "cpu")
    with pytest.raises(HistomilError, match="CPU only"):
        resolve_runtime("onnxruntime", "fp32", "cuda")
    with pytest.raises(HistomilError, match="unknown runtime"):
        resolve_runtime("tensorrt", "fp32", "cpu")


def test_feature_config_takes_a_runtime():
    from pydantic import ValidationError

    from histomil.pipeline import FeatureConfig

    assert FeatureConfig().runtime == "auto"
    assert FeatureConfig(runtime="torch").runtime == "torch"
    with pytest.raises(ValidationError):
        FeatureConfig(runtime="tensorrt")


# ------------------------------------------------------------------------------------ recorded


def test_runtime_recorded_in_feature_files_and_cache_identity(alt_encoders, tile_files, tmp_path):
    alt = alt_encoders(runtimes.AUTO_RUNTIME)
    plain = build_encoder("efficientnet_lite0", precision="fp32", channels_last=True)
    bags = [Bag("a", tuple(tile_files[:3]), 1), Bag("b", tuple(tile_files[3:5]), 0)]

    torch_cache = FeatureCache.for_encoder(tmp_path / "cache", plain)
    alt_cache = FeatureCache.for_encoder(tmp_path / "cache", alt)
    assert torch_cache.root != alt_cache.root  # features of different runtimes never share a cache
    assert alt_cache.encoder_info["runtime"] == runtimes.AUTO_RUNTIME
    # torch keeps the identity it had before runtimes existed, so existing caches stay valid
    assert torch_cache.encoder_info == {**plain.info.to_dict(), "precision": "fp32"}

    s1 = extract_bags(bags, tmp_path / "out", plain, torch_cache, batch_size=4, num_workers=0)
    assert s1.n_written == 2
    assert read_feature_bag(tmp_path / "out" / "a.h5").attrs["runtime"] == "torch"
    before = read_feature_bag(tmp_path / "out" / "a.h5").features

    # the same folder with another runtime: the torch files are not kept, they are re-encoded and re-written
    s2 = extract_bags(bags, tmp_path / "out", alt, alt_cache, batch_size=4, num_workers=0)
    assert s2.n_skipped_existing == 0 and s2.n_written == 2 and s2.n_encoded == 5
    fb = read_feature_bag(tmp_path / "out" / "a.h5")
    assert fb.attrs["runtime"] == runtimes.AUTO_RUNTIME and fb.attrs["precision"] == "fp32"
    assert float(np.abs(fb.features - before).max()) <= FEATURE_TOLERANCE * float(np.abs(before).max())

    s3 = extract_bags(bags, tmp_path / "out", alt, alt_cache, batch_size=4, num_workers=0)
    assert s3.n_skipped_existing == 2  # same runtime: resumed, nothing redone


def test_cli_features_extract_takes_runtime(tile_files, tmp_path):
    from typer.testing import CliRunner

    from histomil.cli import app

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("bag_id,path\n" + "".join(f"bag{i // 2},{p}\n" for i, p in enumerate(tile_files[:4])))
    r = CliRunner().invoke(app, ["features", "extract", str(manifest), str(tmp_path / "f"), "--precision", "fp32",
                                 "--runtime", "torch"])
    assert r.exit_code == 0, r.output
    assert read_feature_bag(tmp_path / "f" / "bag0.h5").attrs["runtime"] == "torch"
    r = CliRunner().invoke(app, ["features", "extract", str(manifest), str(tmp_path / "g"), "--runtime", "tensorrt"])
    assert r.exit_code != 0 and "--runtime must be one of" in r.output

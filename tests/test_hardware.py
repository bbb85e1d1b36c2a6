"""precision="auto": bf16 only where the hardware computes it natively; the choice is recorded."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histomil import hardware
from histomil.cli import app
from histomil.data.bags import load_bags
from histomil.errors import HistomilError
from histomil.features.cache import FeatureCache
from histomil.features.encoders import build_encoder
from histomil.features.extract import extract_bags
from histomil.features.store import read_feature_bag
from histomil.hardware import EmulatedPrecisionWarning, device_description, native_bf16, resolve_precision


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX512-BF16 / AMX (e.g. AMD Zen 3)."""
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: [])


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with AMX (e.g. Intel Sapphire Rapids)."""
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: ["AMX", "AVX512-BF16"])


def test_auto_is_fp32_where_bf16_is_emulated(emulated: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        assert resolve_precision("auto") == "fp32"
        assert resolve_precision("fp32") == "fp32"
    assert not native_bf16("cpu")
    assert device_description("cpu")["bf16"] == "emulated"


def test_auto_is_bf16_where_the_cpu_computes_it(native: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("auto") == "bf16"
        assert resolve_precision("bf16") == "bf16"  # no warning where it is native
    desc = device_description("cpu")
    assert desc["bf16"] == "native" and desc["device_capability"].endswith("+AMX+AVX512-BF16")


def test_explicit_bf16_on_emulating_hardware_warns_once_and_is_honoured(emulated: None) -> None:
    with pytest.warns(EmulatedPrecisionWarning, match="no native bf16.*12-19x slower"):
        assert resolve_precision("bf16") == "bf16"


def test_cuda_needs_compute_capability_8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_precision("auto", "cuda") == "fp32"


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8")
    with pytest.raises(HistomilError, match="unknown precision 'fp8'"):
        build_encoder("efficientnet_lite0", pretrained=False, precision="fp8")


def test_real_cpu_flags_agree_with_torch() -> None:
    """The /proc/cpuinfo reading and torch's own checks name the same units on this machine."""
    flags = hardware._cpu_flags()  # noqa: SLF001 - checking the module's own reading
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    assert ("avx512_bf16" in flags) == bool(torch.cpu._is_avx512_bf16_supported())
    assert ({"amx_bf16", "amx_tile"} <= flags) == bool(torch.cpu._is_amx_tile_supported())


@pytest.mark.parametrize("capability", ["emulated", "native"])
def test_encoder_and_feature_files_record_what_ran(capability: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    request.getfixturevalue(capability)
    encoder = build_encoder("efficientnet_lite0", pretrained=False, precision="auto")
    want = "bf16" if capability == "native" else "fp32"
    assert encoder.precision == want
    bag_dir = tmp_path / "bags" / "b1"
    bag_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(bag_dir / f"t{i}.png")
    (tmp_path / "bags" / "labels.csv").write_text("case,y_true\nb1,1\n")
    bags = load_bags(tmp_path / "bags")
    cache = FeatureCache.for_encoder(tmp_path / "cache", encoder)
    assert cache.encoder_info["precision"] == want  # bf16 and fp32 features never share a cache
    extract_bags(bags, tmp_path / "features", encoder, cache)
    attrs = read_feature_bag(tmp_path / "features" / "b1.h5").attrs
    assert attrs["precision"] == want
    assert attrs["device"] == "cpu" and attrs["device_name"] == hardware.cpu_name()
    assert attrs["bf16"] == capability and attrs["device_capability"]


def test_features_written_in_another_precision_are_recomputed(emulated: None, tmp_path: Path) -> None:
    """A feature folder made in bf16 is not silently kept when extraction now runs in fp32."""
    bag_dir = tmp_path / "bags" / "b1"
    bag_dir.mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)).save(bag_dir / "t.png")
    (tmp_path / "bags" / "labels.csv").write_text("case,y_true\nb1,0\n")
    bags = load_bags(tmp_path / "bags")
    for precision, written in (("fp32", 1), ("fp32", 0)):
        enc = build_encoder("efficientnet_lite0", pretrained=False, precision=precision)
        s = extract_bags(bags, tmp_path / "f", enc, FeatureCache.for_encoder(tmp_path / "c", enc))
        assert s.n_written == written
    enc = build_encoder("efficientnet_lite0", pretrained=False, precision="fp32")
    enc.precision = "bf16"  # as if an earlier run had used bf16 (without paying for emulated bf16 here)
    s = extract_bags(bags, tmp_path / "f", enc, FeatureCache.for_encoder(tmp_path / "c", enc))
    assert s.n_written == 1 and read_feature_bag(tmp_path / "f" / "b1.h5").attrs["precision"] == "bf16"


def test_cli_warns_in_one_line_for_emulated_bf16(emulated: None, tmp_path: Path) -> None:
    bag_dir = tmp_path / "bags" / "b1"
    bag_dir.mkdir(parents=True)
    Image.fromarray(np.full((224, 224, 3), 200, dtype=np.uint8)).save(bag_dir / "t.png")
    (tmp_path / "bags" / "labels.csv").write_text("case,y_true\nb1,1\n")
    r = CliRunner().invoke(app, ["features", "extract", str(tmp_path / "bags"), str(tmp_path / "f"), "--precision", "bf16"])
    assert r.exit_code == 0, r.output
    warning_lines = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "12-19x slower" in r.output
    assert "Warning" not in r.output  # no Python warning header or source line
    assert read_feature_bag(tmp_path / "f" / "b1.h5").attrs["precision"] == "bf16"
    r = CliRunner().invoke(app, ["features", "extract", str(tmp_path / "bags"), str(tmp_path / "g"), "--precision", "fp8"])
    assert r.exit_code == 2 and "--precision must be one of auto, fp32, bf16, fp16" in r.output

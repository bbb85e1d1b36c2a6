"""Bad feature files given to every command that reads them: NaN, inf, a wrong dimension, another
encoder, a truncated file. Each stops the command with exit status 2 and one line naming the file,
and leaves no output (issue 12 item 4; issue 18: no command exits 0 on NaN features or without
checking encoder and dimension)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from feature_files import DIM, invoke, random_bags, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(7)
N = 12


def _clam(path: Path, feats: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["coords"] = np.stack([np.arange(len(feats)) * 256, np.zeros(len(feats))], axis=1).astype(np.int32)


def _trident(path: Path, feats: np.ndarray, encoder: str) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float16)).attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=np.stack([np.arange(len(feats)) * 512, np.zeros(len(feats))], axis=1).astype(np.int64))
        c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 20, "target_magnification": 10})


def _stamp(path: Path, feats: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f["feats"] = feats.astype(np.float16)
        f["coords"] = np.stack([np.arange(len(feats)) * 256.0, np.zeros(len(feats))], axis=1).astype(np.float32)
        f.attrs.update({"extractor": "uni", "unit": "um", "tile_size_um": 256.0, "tile_size_px": 224, "feat_type": "tile"})


def _nan_clam(path: Path) -> str:
    feats = RNG.normal(size=(N, DIM)).astype(np.float32)
    feats[[1, 4, 5], 7] = np.nan
    _clam(path, feats)
    return "NaN or infinite values in 3 of 12 tiles"


def _inf_stamp(path: Path) -> str:
    feats = RNG.normal(size=(N, DIM)).astype(np.float32)
    feats[2, :] = np.inf
    _stamp(path, feats)
    return "NaN or infinite values in 1 of 12 tiles"


def _nan_histomil(path: Path) -> str:
    random_bags(path.parent, {path.stem: 1}, seed=3)
    with h5py.File(path, "r+") as f:
        f["features"][0, 0] = np.nan
    return "NaN or infinite values in 1 of 12 tiles"


def _wrong_dim(path: Path) -> str:
    _clam(path, RNG.normal(size=(N, 512)).astype(np.float32))
    return "512-d"


def _wrong_encoder(path: Path) -> str:
    _trident(path, RNG.normal(size=(N, DIM)).astype(np.float32), "conch_v1")
    return "'conch_v1'"


def _truncated(path: Path) -> str:
    random_bags(path.parent, {path.stem: 1}, seed=4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "bad.h5"


FAULTS = {"nan_clam": _nan_clam, "inf_stamp": _inf_stamp, "nan_histomil": _nan_histomil, "wrong_dim": _wrong_dim,
          "wrong_encoder": _wrong_encoder, "truncated": _truncated}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    train = random_bags(root / "train", {f"t{i}": i % 2 for i in range(6)}, seed=1)
    val = random_bags(root / "val", {f"v{i}": i % 2 for i in range(4)}, seed=2)
    return train_tiny(train, val, root / "run")


def _folder_with_fault(folder: Path, fault: str) -> tuple[Path, str]:
    """Two good uni_v1 bags and ``bad.h5`` (labelled, so only its content is wrong)."""
    random_bags(folder, {"a": 0, "b": 1}, seed=5)
    message = FAULTS[fault](folder / "bad.h5")
    (folder / "labels.csv").write_text("case,y_true\na,0\nb,1\nbad,1\n")
    return folder, message


def _assert_refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.h5" in errors[0] and message in errors[0], result.stderr


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_predict_refuses(fault: str, model: Path, tmp_path: Path) -> None:
    folder, message = _folder_with_fault(tmp_path / "f", fault)
    _assert_refused(invoke("predict", model, folder, "--out", tmp_path / "p.csv"), message)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_evaluate_refuses(fault: str, model: Path, tmp_path: Path) -> None:
    folder, message = _folder_with_fault(tmp_path / "test", fault)
    _assert_refused(invoke("evaluate", model, folder, "--out", tmp_path / "e"), message)
    assert not (tmp_path / "e" / "metrics.json").exists()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_train_refuses(fault: str, tmp_path: Path) -> None:
    folder, message = _folder_with_fault(tmp_path / "train", fault)
    val = random_bags(tmp_path / "val", {"v0": 0, "v1": 1}, seed=6)
    _assert_refused(invoke("train", folder, "--val", val, "--out", tmp_path / "run", "--epochs", 1), message)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_evaluate_checks_every_file_not_only_the_first(model: Path, tmp_path: Path) -> None:
    """The bad file sorts last: 'evaluate' used to check the first file's dimension only, then crash."""
    folder, message = _folder_with_fault(tmp_path / "test", "wrong_dim")
    (folder / "bad.h5").rename(folder / "zz.h5")
    (folder / "labels.csv").write_text("case,y_true\na,0\nb,1\nzz,1\n")
    result = invoke("evaluate", model, folder, "--out", tmp_path / "e")
    assert result.exit_code == 2 and "zz.h5" in result.stderr and "Traceback" not in result.output, result.output


def test_single_feature_file_is_checked_too(model: Path, tmp_path: Path) -> None:
    _nan_clam(tmp_path / "bad.h5")
    _assert_refused(invoke("predict", model, tmp_path / "bad.h5", "--out", tmp_path / "p.csv"), "NaN")

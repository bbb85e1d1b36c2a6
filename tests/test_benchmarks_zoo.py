"""Smoke test of benchmarks/histology_zoo.py on a tiny feature study the test writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from toy_bags import make_bags

from histomil.features.store import write_feature_bag

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def write_split(folder: Path, n: int, seed: int, shift: float) -> None:
    bags, _ = make_bags(n, seed=seed, shift=shift, prefix=folder.name)
    for bag in bags:
        write_feature_bag(folder / f"{bag.bag_id}.h5", bag)


def test_histology_zoo_runs_two_models_two_seeds_and_resumes(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("bench_histology_zoo", BENCH / "histology_zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    feats = tmp_path / "features"
    write_split(feats / "train", 80, 1, 6.0)
    write_split(feats / "val", 16, 2, 6.0)
    write_split(feats / "test_40_20", 20, 3, 6.0)
    write_split(feats / "test_40_1", 20, 4, 6.0)
    (tmp_path / "train.yaml").write_text("batch_size: 4\nepochs: 8\nmin_epochs: 8\npatience: 8\nlr: 0.001\n")
    argv = [
        "--out", str(tmp_path / "out"), "--features", str(feats), "--runs", str(tmp_path / "runs"),
        "--train-config", str(tmp_path / "train.yaml"), "--models", "mean_pool", "abmil", "--seeds", "0", "1",
    ]
    assert zoo.main(argv) == 0
    result = json.loads((tmp_path / "out" / "histology_zoo.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["runs"]) == {"mean_pool", "abmil"}
    assert set(result["runs"]["abmil"]) == {"0", "1"}
    # test sets are ordered easiest first and every cell holds a real accuracy
    assert list(result["summary"]["abmil"]) == ["test_40_20", "test_40_1"]
    for model in ("mean_pool", "abmil"):
        for cell in result["summary"][model].values():
            assert 0.0 <= cell["accuracy"]["mean"] <= 1.0
    # the toy witness is strong: attention pooling finds it
    assert result["summary"]["abmil"]["test_40_20"]["roc_auc"]["mean"] > 0.8
    md = (tmp_path / "out" / "histology_zoo.md").read_text()
    assert "| abmil |" in md and "W=20 acc" in md and "W=1 AUC" in md and "over 2 seeds" in md
    # a second call trains nothing: results come from the run folders
    stamp = (tmp_path / "runs" / "abmil" / "seed0" / "results.json").stat().st_mtime_ns
    assert zoo.main(argv) == 0
    assert (tmp_path / "runs" / "abmil" / "seed0" / "results.json").stat().st_mtime_ns == stamp


def test_histology_zoo_missing_features_is_a_one_line_error(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_histology_zoo2", BENCH / "histology_zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    (tmp_path / "f").mkdir()
    assert zoo.main(["--out", str(tmp_path / "o"), "--features", str(tmp_path / "f"), "--runs", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no 'train' feature folder" in err and "\n" not in err

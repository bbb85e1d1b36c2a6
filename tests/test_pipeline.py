"""End to end on the shipped example tiles: compose -> extract -> train -> evaluate -> predict, via the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histomil.cli import app
from histomil.features.store import read_feature_bag
from histomil.hardware import cpu_name, native_bf16, resolve_precision
from histomil.resources import demo_config_path

runner = CliRunner()

SMALL = [
    "--set", "study.train_bags=40", "--set", "study.val_bags=20", "--set", "study.test_bags=20",
    "--set", "train.epochs=3", "--set", "train.min_epochs=1", "--set", "train.batch_size=8",
]


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    result = invoke("demo", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    return out


def test_demo_runs_every_step_and_prints_the_table(demo_run: Path):
    metrics = json.loads((demo_run / "evaluation" / "metrics.json").read_text())["results"]
    assert list(metrics) == ["test_40_20", "test_40_10", "test_40_5", "test_40_1"]
    for name, m in metrics.items():
        assert m["n"] == 20 and m["n_pos"] == 10
        assert 0.0 <= m["accuracy"] <= 1.0
        assert sum(map(sum, m["confusion_matrix"])) == 20
        assert "attention" in m  # composed studies carry tile truth
    # the easy set must be learnt even after 3 epochs on 40 bags
    assert metrics["test_40_20"]["roc_auc"] > 0.8
    timings = json.loads((demo_run / "timings.json").read_text())
    assert set(timings) == {"compose bags", "extract features", "train", "evaluate"}
    # the run says which precision "auto" chose on this machine, and why, beside the features it made
    env = json.loads((demo_run / "environment.json").read_text())
    assert env["precision_requested"] == "auto" and env["precision"] == resolve_precision("auto")
    assert env["device_name"] == cpu_name() and env["bf16"] == ("native" if native_bf16() else "emulated")
    feature_file = next((demo_run / "features" / "train").glob("*.h5"))
    assert read_feature_bag(feature_file).attrs["precision"] == env["precision"]
    for png in ["training_curves.png", "roc_pr.png", "confusion_test_40_1.png"]:
        assert (demo_run / "evaluation" / png).stat().st_size > 1000
    history = list(csv.DictReader(open(demo_run / "model" / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]


def test_each_distinct_tile_is_encoded_once(demo_run: Path):
    sources = set()
    for truth in (demo_run / "bags").glob("*/tiles.csv"):
        sources |= {r["source"] for r in csv.DictReader(open(truth))}
    cache_dir = next((demo_run / "features" / "cache").iterdir())
    from histomil.features.cache import FeatureCache

    cache = FeatureCache(cache_dir.parent, json.loads((cache_dir / "encoder.json").read_text()))
    # 40 + 20 + 4 x 20 bags of 40 tiles reuse a few hundred tiles: each is encoded exactly once
    assert len(cache) == len(sources) < 0.1 * (40 + 20 + 80) * 40


def test_bad_tiles_stop_or_are_skipped(demo_run: Path, tmp_path):
    root = tmp_path / "bags"
    src = demo_run / "bags" / "test_40_20"
    for case in ["0", "1"]:
        shutil.copytree(src / case, root / case)
    (root / "labels.csv").write_text("case,y_true\n0,0\n1,1\n")
    bad = sorted((root / "1").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated JPEG
    result = invoke("features", "extract", root, tmp_path / "f1")
    assert result.exit_code == 2
    assert bad.name in result.output and "Traceback" not in result.output
    result = invoke("features", "extract", root, tmp_path / "f2", "--on-bad-tile", "skip")
    assert result.exit_code == 0, result.output
    from histomil.features.store import read_feature_bag

    assert len(read_feature_bag(tmp_path / "f2" / "0.h5")) == 40
    kept = read_feature_bag(tmp_path / "f2" / "1.h5")
    assert len(kept) == 39 and not any(p.endswith(bad.name) for p in kept.tile_paths)
    assert read_feature_bag(tmp_path / "f2" / "1.h5").label == 1


def test_rerun_resumes_without_recomputing(demo_run: Path, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, symlinks=True)
    before = {p: p.stat().st_mtime_ns for p in (run / "features" / "train").glob("*.h5")}
    result = invoke("demo", "--out", run, *SMALL)
    assert result.exit_code == 0, result.output
    after = {p: p.stat().st_mtime_ns for p in (run / "features" / "train").glob("*.h5")}
    assert before == after  # feature files reused, not rewritten


def test_evaluate_and_predict_commands(demo_run: Path, tmp_path):
    model = demo_run / "model" / "model.pt"
    feats = demo_run / "features"
    result = invoke("evaluate", model, feats / "test_40_20", feats / "test_40_1", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert "test_40_20" in result.output and "roc_auc" in result.output
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert md.count("\n| test_40") == 2
    # predict on image bag folders without labels: encodes on the fly with the model's encoder
    bags = tmp_path / "unlabelled"
    src = demo_run / "bags" / "test_40_1"
    for case in ["0", "1", "2"]:
        shutil.copytree(src / case, bags / case)
    result = invoke("predict", model, bags, "--out", tmp_path / "pred.csv", "--top-k", 3)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert [r["bag_id"] for r in rows] == ["0", "1", "2"]
    for r in rows:
        assert 0.0 <= float(r["prob_positive"]) <= 1.0
        assert len(r["top_tiles"].split(";")) == 3
        assert all((bags / r["bag_id"] / t).exists() for t in r["top_tiles"].split(";"))
    # the same bags through their cached features give the same probabilities
    by_feat = invoke("predict", model, feats / "test_40_1", "--out", tmp_path / "pred2.csv")
    assert by_feat.exit_code == 0, by_feat.output
    ref = {r["bag_id"]: float(r["prob_positive"]) for r in csv.DictReader(open(tmp_path / "pred2.csv"))}
    for r in rows:
        assert float(r["prob_positive"]) == pytest.approx(ref[r["bag_id"]], abs=2e-3)


def test_user_errors_are_one_line(tmp_path):
    result = invoke("bags", "make", tmp_path / "missing.csv", tmp_path / "out")
    assert result.exit_code == 2
    assert "missing.csv" in result.output and "Traceback" not in result.output
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(demo_config_path().read_text() + "\nunknown_key: 1\n")
    result = invoke("run", cfg, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "unknown_key" in result.output
    result = invoke("train", tmp_path, "--val", tmp_path, "--out", tmp_path / "r", "--monitor", "accuracy")
    assert result.exit_code == 2 and "monitor" in result.output


def _bag_subset(src: Path, dst: Path, cases: list[str]) -> Path:
    labels = {r["case"]: r["y_true"] for r in csv.DictReader(open(src / "labels.csv"))}
    for case in cases:
        shutil.copytree(src / case, dst / case)
    (dst / "labels.csv").write_text("case,y_true\n" + "".join(f"{c},{labels[c]}\n" for c in cases))
    truth = [r for r in csv.DictReader(open(src / "tiles.csv")) if r["case"] in cases]
    with open(dst / "tiles.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(truth[0]))
        w.writeheader()
        w.writerows(truth)
    return dst


def test_original_architecture_trains_and_evaluates_from_pixels(demo_run: Path, tmp_path):
    """The original project's CNN + concatenation head, end to end through the CLI (tiny and fast)."""
    src = demo_run / "bags" / "test_40_20"
    train_dir = _bag_subset(src, tmp_path / "train", [str(i) for i in range(6)])
    val_dir = _bag_subset(src, tmp_path / "val", [str(i) for i in range(6, 10)])
    run = tmp_path / "run"
    result = invoke("train-pixels", train_dir, "--val", val_dir, "--out", run, "--backbone", "original",
                    "--input-size", "32", "--epochs", "2", "--min-epochs", "1", "--workers", "0")
    assert result.exit_code == 0, result.output
    history = list(csv.DictReader(open(run / "history.csv")))
    assert len(history) == 2
    result = invoke("evaluate", run / "model.pt", val_dir, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["results"]["val"]
    assert metrics["n"] == 4 and sum(map(sum, metrics["confusion_matrix"])) == 4
    assert "attention" in metrics  # per-tile attention of the gated head, checked against tile truth

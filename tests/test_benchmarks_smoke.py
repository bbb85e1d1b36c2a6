"""Smoke tests of the benchmark scripts on tiny inputs: outputs written, numbers sane."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from histomil.hardware import resolve_precision

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def classical():
    return load("classical_mil")


@pytest.fixture(scope="module")
def scale():
    return load("scale")


def test_classical_mil_quick_on_musk1(classical, shared_data, tmp_path, one_thread):
    rc = classical.main(["--data", str(shared_data / "mil"), "--out", str(tmp_path), "--quick", "--datasets", "musk1"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "classical_mil.csv").read_text().splitlines()))
    assert len(rows) == 2 * 2  # 2 folds x 2 models
    assert {r["model"] for r in rows} == {"abmil_small", "gated_abmil_small"}
    assert sum(int(r["n_test"]) for r in rows if r["model"] == "abmil_small") == 92  # every bag tested once
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    summary = json.loads((tmp_path / "classical_mil.json").read_text())["summary"]
    assert [s["protocol"] for s in summary] == ["1 x 2-fold"] * 2
    assert all(0.3 < s["accuracy_mean"] <= 1.0 and s["accuracy_se"] >= 0 for s in summary)
    table = (tmp_path / "classical_mil.md").read_text()
    assert "| Ilse et al. attention | 5 x 10-fold | 0.892 |" in table and "1 x 2-fold" in table

    # merging per-fold CSVs recomputes the same summary
    merged = tmp_path / "merged"
    assert classical.main(["--data", "unused", "--out", str(merged), "--merge", str(tmp_path / "classical_mil.csv")]) == 0
    again = json.loads((merged / "classical_mil.json").read_text())["summary"]
    assert [s["accuracy_mean"] for s in again] == pytest.approx([s["accuracy_mean"] for s in summary])


def test_classical_mil_takes_a_data_set_outside_the_published_table(classical, shared_data, tmp_path, one_thread):
    """Any MIL CSV works: the summary is written even though the paper has no row for it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "mydata.csv").write_bytes((shared_data / "mil" / "musk1.csv").read_bytes())
    rc = classical.main(["--data", str(data), "--out", str(tmp_path / "o"), "--quick", "--datasets", "mydata",
                         "--models", "abmil_small"])
    assert rc == 0
    table = (tmp_path / "o" / "classical_mil.md").read_text()
    assert "| histomil abmil_small (ours) | 1 x 2-fold |" in table and "Ilse et al." not in table
    # beside a published data set, the other one's published cells are "—"
    (data / "musk1.csv").write_bytes((shared_data / "mil" / "musk1.csv").read_bytes())
    rc = classical.main(["--data", str(data), "--out", str(tmp_path / "p"), "--quick", "--datasets", "musk1", "mydata",
                         "--models", "abmil_small"])
    assert rc == 0
    assert "| Ilse et al. attention | 5 x 10-fold | 0.892 | — |" in (tmp_path / "p" / "classical_mil.md").read_text()


def test_classical_mil_inner_selection_chooses_epochs_inside_the_training_fold(classical, shared_data, tmp_path, one_thread):
    rc = classical.main(["--data", str(shared_data / "mil"), "--out", str(tmp_path), "--quick", "--datasets", "musk1",
                         "--models", "abmil_small", "--select", "inner", "--max-epochs", "4", "--patience", "2"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "classical_mil.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["abmil_small+inner"] * 2
    assert all(1 <= int(r["epochs"]) <= 4 for r in rows)
    assert "inner split" in json.loads((tmp_path / "classical_mil.json").read_text())["settings"]["selection"]


def test_select_epochs_never_sees_the_test_fold_and_finds_a_learnable_optimum(classical, one_thread):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from histomil.models.registry import build_model

    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(40):  # a witness feature: learnable within a few epochs
        y = i % 2
        x = rng.normal(size=(6, 4)).astype(np.float32)
        x[0, 0] += 4.0 * y
        xs.append(torch.from_numpy(x).unsqueeze(0))
        ys.append(y)
    calls = []

    def make():
        calls.append(1)
        return build_model("abmil_small", 4, 2)

    def loss(model, x, t):
        return F.cross_entropy(model(x).logits, t)

    epochs = classical.select_epochs(make, loss, xs, np.array(ys), max_epochs=30, patience=5, seed=0)
    assert len(calls) == 1 and 1 <= epochs <= 30
    assert epochs > 1  # the held-out loss keeps falling for a while on a learnable problem


def test_classical_mil_missing_data_is_a_one_line_error(classical, tmp_path, capsys):
    assert classical.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quick", "--datasets", "musk1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "musk1.csv" in err and "\n" not in err


def test_standardisation_uses_training_bags_only(classical):
    import numpy as np

    from histomil.features.store import FeatureBag

    train = [FeatureBag("a", np.array([[0.0, 5.0], [2.0, 5.0]], dtype=np.float32), [], 0)]
    test = [FeatureBag("b", np.array([[100.0, 7.0]], dtype=np.float32), [], 1)]
    tr, te = classical.standardise(train, test)
    np.testing.assert_allclose(tr[0][0].numpy(), [[-1, 0], [1, 0]])  # constant feature: std treated as 1
    np.testing.assert_allclose(te[0][0].numpy(), [[99, 2]])  # (100 - 1) / 1, (7 - 5) / 1


def test_scale_tiny_run_writes_rows_plot_and_slopes(scale, tmp_path):
    rc = scale.main(["--out", str(tmp_path), "--sizes", "16", "--models", "abmil", "--threads", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "scale.json").read_text())
    rows = data["rows"]
    assert [(r["mode"], r["n"]) for r in rows] == [("infer", 16), ("infer_bf16", 16), ("train", 16)]
    for r in rows:
        assert r["status"] == "ok"
        assert 0 < r["seconds"] < 5 and r["peak_mb"] > 50 and r["delta_mb"] >= 0
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader((tmp_path / "scale.csv").read_text().splitlines()))) == 3
    assert "inference (predict, bf16 autocast)" in (tmp_path / "scale.md").read_text()


def test_scale_over_time_limit_is_killed_and_larger_sizes_skipped(scale, tmp_path):
    rc = scale.main(["--out", str(tmp_path), "--sizes", "10", "100", "--models", "abmil", "--modes", "infer",
                     "--threads", "1", "--max-seconds", "0.01"])
    assert rc == 1  # a measurement did not finish
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert rows[0]["status"].startswith("killed after")
    assert rows[1]["status"].startswith("skipped: smaller bag killed")


def test_loglog_slopes(scale):
    rows = [{"model": "m", "mode": "infer", "n": n, "status": "ok", "seconds": 1e-6 * n} for n in (100, 1000, 10000)]
    rows += [{"model": "q", "mode": "train", "n": n, "status": "ok", "seconds": 1e-9 * n * n} for n in (1000, 10000)]
    assert scale.slopes(rows) == {"m": {"infer": pytest.approx(1.0)}, "q": {"train": pytest.approx(2.0)}}


# --- MNIST-bags (benchmarks/mnist_bags.py) -------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_bags():
    return load("mnist_bags")


def test_mnist_bags_quick_writes_outputs_and_resumes(mnist_bags, shared_data, tmp_path, one_thread, capsys):
    args = ["--data", str(shared_data / "mnist"), "--out", str(tmp_path), "--quick"]
    assert mnist_bags.main(args) == 0
    for name in ("mnist_bags.csv", "mnist_bags.json", "mnist_bags.md", "mnist_bags.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "mnist_bags.csv").read_text().splitlines()))
    assert len(rows) == 2  # 1 size x 1 rep x 2 models
    assert {r["model"] for r in rows} == {"attention", "gated_attention"}
    for r in rows:
        assert (r["n_train"], r["n_test"], r["rep"], r["epochs"]) == ("20", "100", "0", "2")
        assert 0.0 <= float(r["auc"]) <= 1.0 and 0.0 <= float(r["accuracy"]) <= 1.0
        assert 0.0 < float(r["test_pos_frac"]) < 1.0 and float(r["seconds"]) > 0
    data = json.loads((tmp_path / "mnist_bags.json").read_text())
    summary = [(s["model"], s["n_train"], s["n_reps"]) for s in data["summary"]]
    assert summary == [("attention", 20, 1), ("gated_attention", 20, 1)]
    assert data["machine"]["cpu_count"] >= 1 and "stopping" in data["settings"]
    assert "| 20 | 2 |" in (tmp_path / "mnist_bags.md").read_text()
    assert (tmp_path / "mnist_bags.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rerun: every row is already there, nothing is trained again
    before = (tmp_path / "mnist_bags.csv").read_text()
    capsys.readouterr()
    assert mnist_bags.main(args) == 0
    assert "resuming: 2 row(s)" in capsys.readouterr().out and (tmp_path / "mnist_bags.csv").read_text() == before
    # rows made with other settings are not silently mixed in
    assert mnist_bags.main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "mnist_bags.csv" in err and "\n" not in err


def test_mnist_bags_pools_are_disjoint_and_bags_follow_the_rules(mnist_bags, shared_data):
    import numpy as np

    images, labels = mnist_bags.load_mnist(shared_data / "mnist")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    train, test = mnist_bags.split_pools(labels)
    assert len(train) == len(test) == 5000 and np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(10000))  # every digit in exactly one pool
    again = mnist_bags.split_pools(labels)
    np.testing.assert_array_equal(again[0], train)  # the split is fixed
    assert np.abs(np.bincount(labels[train], minlength=10) - np.bincount(labels[test], minlength=10)).max() <= 1

    bags, y = mnist_bags.make_bags(labels, train, 4000, np.random.default_rng(0))
    assert all(np.isin(b, train).all() for b in bags)  # training bags use training-pool digits only
    np.testing.assert_array_equal(y, [int((labels[b] == 9).any()) for b in bags])
    sizes = np.array([len(b) for b in bags])
    assert sizes.min() >= 1 and abs(sizes.mean() - 10) < 0.2 and abs(sizes.std() - 2) < 0.2
    assert 0.55 < y.mean() < 0.75  # 1 - E[0.9^size] is about 0.65
    test_bags, _ = mnist_bags.make_bags(labels, test, 200, np.random.default_rng(1))
    assert all(np.isin(b, test).all() for b in test_bags)


def test_mnist_bags_bad_input_is_a_one_line_error(mnist_bags, shared_data, tmp_path, capsys):
    import shutil

    assert mnist_bags.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and mnist_bags.IMAGES_FILE in err and "not found" in err and "\n" not in err

    # a labels file where the images file should be: wrong idx magic, named in the message
    shutil.copy(shared_data / "mnist" / mnist_bags.LABELS_FILE, tmp_path / mnist_bags.IMAGES_FILE)
    shutil.copy(shared_data / "mnist" / mnist_bags.LABELS_FILE, tmp_path / mnist_bags.LABELS_FILE)
    assert mnist_bags.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and mnist_bags.IMAGES_FILE in err and "magic" in err and "\n" not in err


@pytest.fixture(scope="module")
def throughput():
    return load("throughput")


def test_throughput_quick_on_ebhi_tiles(throughput, shared_data, tmp_path, one_thread):
    import math

    rc = throughput.main(["--out", str(tmp_path), "--quick", "--threads", "1", "--data", str(shared_data / "ebhi"),
                          "--models", "abmil", "clam_sb"])
    assert rc == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["settings"]["threads"] == 1 and data["settings"]["quick"]
    assert len(data["machine"]["loadavg_1_5_15"]) == 3 and len(data["loadavg_after"]) == 3

    def positive(x):
        return isinstance(x, float) and math.isfinite(x) and x > 0

    extract = data["extract"]
    assert extract["n_tiles"] == 16 and extract["tile_shapes"] == [[224, 224, 3]]
    (row,) = extract["rows"]  # quick: only the precision "auto" picks on this machine (no emulated bf16)
    assert row["precision"] == resolve_precision("auto")
    for key in ("decode_tiles_per_s", "encode_tiles_per_s", "pipeline_tiles_per_s", "hash_tiles_per_s",
                "pipeline_over_slower_stage"):
        assert positive(row[key]), key
    feats = data["features"]
    assert {(r["model"], r["batch_size"], r["mode"]) for r in feats} == {
        (m, bs, mode) for m in ("abmil", "clam_sb") for bs in (1, 16) for mode in ("infer", "train")}
    assert all(positive(r["bags_per_s"]) for r in feats)
    pixels = data["pixels"]
    assert [(r["backbone"], r["tile_px"], r["finetune"]) for r in pixels] == [
        ("efficientnet_lite0", 224, "none"), ("efficientnet_lite0", 224, "all"), ("original", 256, "all")]
    assert all(positive(r["infer_bags_per_s"]) and positive(r["train_bags_per_s"]) for r in pixels)
    assert all(r["tiles_per_bag"] == 4 and len(r["train_step_seconds"]) == 1 for r in pixels)
    table = (tmp_path / "throughput.md").read_text()
    precision = resolve_precision("auto")
    assert f"| {precision} | " in table and "| abmil | " in table and "| clam_sb | " in table
    assert f"| efficientnet_lite0 | 224 | gated_abmil | all | {precision} | " in table
    assert f"| original | 256 | original_concat | all | {precision} | " in table


def test_throughput_unknown_model_is_a_one_line_error(throughput, tmp_path, capsys):
    assert throughput.main(["--out", str(tmp_path), "--quick", "--models", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope" in err and "\n" not in err


# --- peer comparison with torchmil (benchmarks/peer_torchmil.py; torchmil lives only in .venv-bench) ---


@pytest.fixture(scope="module")
def peer():
    return load("peer_torchmil")  # must import without torchmil: it is imported only when a run starts


def test_peer_torchmil_parts_without_torchmil(peer, capsys):
    assert set(peer.PAIRS) == {"abmil", "gated_abmil", "clam_sb", "dsmil", "transmil", "mean_pool", "max_pool"}
    assert set(peer.SMALL_PAIRS) == {"abmil_small", "gated_abmil_small"}
    calls = []
    timing = peer.interleaved(lambda: calls.append("o"), lambda: calls.append("t"), repeats=3)
    assert calls == ["o", "t", "o", "t", "t", "o", "o", "t"]  # cold pair, then alternating order
    assert timing["repeats"] == 3 and timing["ours_seconds"] >= 0 and timing["theirs_seconds"] >= 0
    rows = [{"part": "accuracy", "pair": "abmil_small", "dataset": "musk1", "rep": 0, "fold": k, "n_test": 10,
             "ours_accuracy": a, "theirs_accuracy": b, "ours_seconds": 1.0, "theirs_seconds": 2.0, "status": "ok"}
            for k, (a, b) in enumerate([(0.9, 0.8), (0.7, 0.8)])]
    (s,) = peer.accuracy_summary(rows, folds=2)
    assert s["ours_mean"] == pytest.approx(0.8) and s["theirs_mean"] == pytest.approx(0.8)
    assert s["ratio"] == pytest.approx(1.0) and s["paired_diff_mean"] == pytest.approx(0.0)
    assert s["paired_diff_se"] == pytest.approx(0.1) and s["protocol"] == "1 x 2-fold"
    table = peer.markdown(rows, [], [s], {"epochs": 30, "threads": 1})
    assert "| musk1 | abmil_small | 0.800 ± 0.100 | 0.800 ± 0.000 | 1.000 | +0.000 ± 0.100 | 1.0 / 2.0 |" in table
    if importlib.util.find_spec("torchmil") is None:  # CI's environment: one clear line, exit 2
        assert peer.main(["--out", "unused", "--parts", "speed"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: torchmil is not installed") and "\n" not in err


def test_peer_torchmil_quick(peer, shared_data, tmp_path, one_thread):
    pytest.importorskip("torchmil")
    rc = peer.main(["--data", str(shared_data / "mil"), "--out", str(tmp_path), "--quick", "--datasets", "musk1"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "peer_torchmil.csv").read_text().splitlines()))
    speed = [r for r in rows if r["part"] == "speed"]
    assert len(speed) == 7 * 2  # 7 model pairs x (infer, train) at N=64
    assert all(r["status"] == "ok" and float(r["ours_seconds"]) > 0 and float(r["theirs_seconds"]) > 0 for r in speed)
    acc = [r for r in rows if r["part"] == "accuracy"]
    assert len(acc) == 2 * 2  # 2 folds x 2 small models
    assert sum(int(r["n_test"]) for r in acc if r["pair"] == "abmil_small") == 92  # every Musk1 bag tested once
    assert all(0.0 <= float(r[k]) <= 1.0 for r in acc for k in ("ours_accuracy", "theirs_accuracy"))
    data = json.loads((tmp_path / "peer_torchmil.json").read_text())
    assert data["settings"]["torchmil_version"] and len(data["models"]) == 7
    assert all(m["ours_params"] > 0 and m["theirs_params"] > 0 for m in data["models"])
    assert [s["protocol"] for s in data["accuracy_summary"]] == ["1 x 2-fold"] * 2
    table = (tmp_path / "peer_torchmil.md").read_text()
    assert "## Speed" in table and "| transmil | " in table and "## Accuracy" in table


@pytest.fixture(scope="module")
def cpu_encoders():
    return load("cpu_encoders")


def test_cpu_encoders_tiny_run_writes_tables(cpu_encoders, tmp_path):
    rc = cpu_encoders.main(["--out", str(tmp_path), "--quick", "--random", "--tiles", "2", "--batch-size", "2",
                            "--paths", "torch fp32 channels_last", "--vit-tiles", "0", "--threads", "1"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "cpu_encoders.csv").read_text().splitlines()))
    assert [r["path"] for r in rows] == ["torch fp32 eager", "torch fp32 channels_last"]
    assert all(r["status"] == "ok" and float(r["tiles_per_s"]) > 0 and r["cpu"] for r in rows)
    assert float(rows[1]["rel_max_abs_diff"]) < 1e-4  # channels_last: the same features
    data = json.loads((tmp_path / "cpu_encoders.json").read_text())
    assert data["machine"]["torch_cpu_capability"] and data["settings"]["threads"] == 1
    assert data["decision"]["choice"] is None  # no alternative runtime was measured
    table = (tmp_path / "cpu_encoders.md").read_text()
    assert data["machine"]["cpu_model_name"] in table and "## Decision" in table


def test_cpu_encoders_decision_needs_speed_and_matching_features(cpu_encoders):
    def row(path, rate, rel=None, precision="fp32"):
        return {"model": cpu_encoders.LITE0, "path": path, "precision": precision, "tiles_per_s": rate,
                "rel_max_abs_diff": rel, "within_tolerance": rel is not None and rel <= 1e-4}

    base = [row("torch fp32 eager", 50.0), row("torch fp32 channels_last", 80.0), row("torch bf16 eager", 300.0, 0.03, "bf16")]
    fast = cpu_encoders.decide([*base, row("OpenVINO fp32", 120.0, 2e-6), row("ONNX Runtime fp32", 100.0, 2e-6)], 1.3)
    assert fast["choice"] == "OpenVINO fp32" and fast["speedup"] == pytest.approx(1.5)  # vs the best torch fp32, not bf16
    assert cpu_encoders.decide([*base, row("OpenVINO fp32", 100.0, 2e-6)], 1.3)["choice"] is None  # 1.25x: not enough
    assert cpu_encoders.decide([*base, row("OpenVINO fp32", 200.0, 1e-2)], 1.3)["choice"] is None  # features differ

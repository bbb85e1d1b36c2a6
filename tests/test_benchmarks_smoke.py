"""Smoke tests of the benchmark scripts on tiny inputs: outputs written, numbers sane."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

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
    assert [(r["mode"], r["n"]) for r in rows] == [("infer", 16), ("train", 16)]
    for r in rows:
        assert r["status"] == "ok"
        assert 0 < r["seconds"] < 5 and r["peak_mb"] > 50 and r["delta_mb"] >= 0
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader((tmp_path / "scale.csv").read_text().splitlines()))) == 2


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

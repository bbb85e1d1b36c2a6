"""Survival cross-validation of a slide cohort through the CLI: folds stratified on the event and grouped
by patient, c-index per fold and pooled in metrics.json near the oracle, one-line errors for bad inputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histomil.cli import app
from histomil.evaluation.survival import cindex_harrell, survival_targets
from histomil.features.store import FeatureBag, write_feature_bag

pytestmark = pytest.mark.usefixtures("one_thread")
DIM = 16


def write_survival_cohort(root: Path, n_patients: int = 60, seed: int = 0) -> tuple[Path, Path, dict[str, float]]:
    """(cohort.csv, feature folder, patient -> true log hazard). Patients have 1-2 slides of 20-40 tiles; a
    fraction f of a patient's tiles is shifted along 4 features and its hazard is exp(3 f); ~30% censored."""
    rng = np.random.default_rng(seed)
    feats_dir = root / "features"
    feats_dir.mkdir(parents=True)
    rows, truth = [], {}
    for i in range(n_patients):
        patient = f"P{i:03d}"
        f = float(rng.uniform(0, 1))
        log_h = 3.0 * f
        t_event, t_cens = rng.exponential(np.exp(-log_h)), rng.exponential(1.5)
        time, event = min(t_event, t_cens), int(t_event <= t_cens)
        truth[patient] = log_h
        for j in range(1 + i % 2):
            n = int(rng.integers(20, 41))
            x = rng.normal(size=(n, DIM)).astype(np.float32)
            x[: int(round(f * n)), :4] += 2.5
            slide = f"{patient}-S{j}"
            write_feature_bag(feats_dir / f"{slide}.h5", FeatureBag(slide, x, [str(t) for t in range(n)], attrs={"encoder": "toy"}))
            rows.append({"slide": slide, "patient": patient, "os_months": f"{time:.6f}", "dead": event})
    table = root / "cohort.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide", "patient", "os_months", "dead"])
        w.writeheader()
        w.writerows(rows)
    return table, feats_dir, truth


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("survival_cv")
    table, feats, truth = write_survival_cohort(root)
    out = root / "cv"
    args = ["crossval", "--table", str(table), "--features", str(feats), "--task", "survival", "--time", "os_months",
            "--event", "dead", "--folds", "4", "--out", str(out), "--epochs", "15",
            "--set", "train.lr=2e-3", "--set", "train.batch_size=8", "--set", "train.threads=1",
            "--set", "bootstrap_resamples=30", "--set", "train.model_kwargs={embed_dim: 32, attn_dim: 16}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return table, out, truth, result.output, args


def test_metrics_json_has_cindex_per_fold_and_pooled(survival_run) -> None:
    table, out, truth, output, _ = survival_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "survival" and m["time"] == "os_months" and m["event"] == "dead"
    assert len(m["per_fold"]) == 4
    for fold in m["per_fold"]:
        c = fold["metrics"]["cindex_harrell"]
        assert 0.0 <= c <= 1.0 and fold["metrics"]["ci"]["cindex_harrell"]["low"] <= c
        assert (out / fold["dir"] / "km_test.png").is_file() and (out / fold["dir"] / "model.pt").is_file()
    pooled = m["pooled"]["seed-0"]
    assert pooled["n_patients"] == 60
    # the pooled c-index is recomputed from the out-of-fold table, and the model finds the hazard
    with open(out / "oof_predictions.csv", newline="") as fh:
        oof = list(csv.DictReader(fh))
    assert sorted(r["patient"] for r in oof) == sorted(truth)  # every patient once
    targets = survival_targets([float(r["time"]) for r in oof], [int(r["event"]) for r in oof])
    risk = [float(r["risk"]) for r in oof]
    assert pooled["cindex_harrell"]["value"] == pytest.approx(cindex_harrell(targets, risk))
    oracle = cindex_harrell(targets, [truth[r["patient"]] for r in oof])
    assert oracle > 0.7
    assert m["mean_over_folds"]["cindex_harrell"]["mean"] > oracle - 0.12, (m["mean_over_folds"], oracle)
    assert "c-index" in output or "cindex_harrell" in output
    assert not (out / "ensemble.pt").exists()


def test_folds_are_patient_grouped_and_stratified_on_the_event(survival_run) -> None:
    table, out, _, _, _ = survival_run
    event = {}
    with open(table, newline="") as fh:
        for r in csv.DictReader(fh):
            event[r["patient"]] = int(r["dead"])
    folds = json.loads((out / "seed-0" / "folds.json").read_text())["folds"]
    tested = [p for f in folds for p in f["test"]]
    assert sorted(tested) == sorted(event)  # each patient tested once, so never in two test folds
    for f in folds:
        assert not set(f["test"]) & (set(f["train"]) | set(f["val"]))
    events_per_fold = [sum(event[p] for p in f["test"]) for f in folds]
    censored_per_fold = [len(f["test"]) - e for f, e in zip(folds, events_per_fold)]
    assert max(events_per_fold) - min(events_per_fold) <= 2 and max(censored_per_fold) - min(censored_per_fold) <= 2


def test_survival_crossval_input_errors_are_one_line(tmp_path) -> None:
    table, feats, _ = write_survival_cohort(tmp_path, n_patients=12)
    base = ["crossval", "--table", str(table), "--features", str(feats), "--folds", "3"]
    runner = CliRunner()
    cases = [
        (["--task", "survival", "--event", "dead"], "time column"),
        (["--task", "survival", "--time", "nope", "--event", "dead"], "no time column 'nope'"),
        (["--task", "survival", "--time", "os_months", "--event", "os_months"], "event column"),
        (["--task", "survival", "--time", "dead", "--event", "dead"], "not a number above 0"),
        (["--time", "os_months", "--target", "dead"], "only it takes one"),  # a time column without task survival
        (["--task", "survival", "--time", "os_months", "--event", "dead", "--target", "patient"], "not both"),
    ]
    for i, (extra, msg) in enumerate(cases):
        result = runner.invoke(app, base + extra + ["--out", str(tmp_path / f"cv{i}")])
        assert result.exit_code == 2, result.output
        assert msg in result.output and "Traceback" not in result.output, result.output


def test_a_rerun_skips_finished_folds_and_writes_the_same_results(survival_run) -> None:
    _, out, _, _, args = survival_run
    before = json.loads((out / "metrics.json").read_text())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, skipped") == 4
    after = json.loads((out / "metrics.json").read_text())
    assert after["pooled"] == before["pooled"] and after["per_fold"] == before["per_fold"]


def test_discrete_time_crossval_scores_its_own_survival_curves(tmp_path) -> None:
    table, feats, _ = write_survival_cohort(tmp_path, n_patients=40, seed=1)
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, [
        "crossval", "--table", str(table), "--features", str(feats), "--task", "survival", "--time", "os_months",
        "--event", "dead", "--folds", "3", "--out", str(out), "--epochs", "6", "--set", "train.loss=discrete",
        "--set", "train.task_options={n_bins: 3}", "--set", "train.batch_size=8", "--set", "bootstrap_resamples=10"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["loss"] == "discrete"
    for fold in m["per_fold"]:
        assert math.isfinite(fold["metrics"]["ibs"]) and 0 < fold["metrics"]["ibs"] < 0.5
    with open(out / "seed-0" / "fold-0" / "predictions_test.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["bag_id", "time", "event", "risk", "survival_bin_0", "survival_bin_1", "survival_bin_2", "risk_group"]

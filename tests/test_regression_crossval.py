"""Regression cross-validation of a slide cohort through the CLI (``crossval --task regression``): folds
grouped by patient and stratified on the target's quantiles, a learned signal (out-of-fold R² well above
0, and not with shuffled targets), pooled metrics recomputed from the out-of-fold table, resume, the fold
models' ``ensemble.pt`` predicting the held-out patients, ``evaluate --table`` scoring the fold models and
the ensemble on them, and one-line errors for bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histomil.cli import app
from histomil.data.cohort import load_slide_features, match_feature_files, read_cohort
from histomil.evaluation.cohort_evaluate import evaluate_cohort
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.splitting import quantile_strata
from histomil.evaluation.target_cv import mean_fold_outputs
from histomil.evaluation.task_metrics import regression_metrics
from histomil.features.store import FeatureBag, write_feature_bag
from histomil.training.checkpoint import read_checkpoint_dict
from histomil.training.tasks import regression_scores

pytestmark = pytest.mark.usefixtures("one_thread")
DIM = 16
FAST = ["--set", "train.lr=2e-3", "--set", "train.batch_size=8", "--set", "train.threads=1",
        "--set", "bootstrap_resamples=30", "--set", "train.model_kwargs={embed_dim: 32, attn_dim: 16}"]


def write_regression_cohort(root: Path, n_patients: int = 40, seed: int = 0, shuffle: bool = False,
                            split_test: int = 0) -> tuple[Path, Path, dict[str, float]]:
    """(cohort.csv, feature folder, patient -> target). A fraction f of a patient's tiles (1-2 slides of 20-40)
    is shifted along 4 features and its target is 10 f; ``shuffle`` deals the targets out to other patients
    (no signal left); the last ``split_test`` patients are marked ``test`` in a split column."""
    rng = np.random.default_rng(seed)
    feats_dir = root / "features"
    feats_dir.mkdir(parents=True)
    fraction = rng.uniform(0, 1, size=n_patients)
    target = 10.0 * (rng.permutation(fraction) if shuffle else fraction)
    rows, truth = [], {}
    for i in range(n_patients):
        patient = f"P{i:03d}"
        truth[patient] = float(f"{target[i]:.6f}")
        for j in range(1 + i % 2):
            n = int(rng.integers(20, 41))
            x = rng.normal(size=(n, DIM)).astype(np.float32)
            x[: int(round(fraction[i] * n)), :4] += 2.5
            slide = f"{patient}-S{j}"
            write_feature_bag(feats_dir / f"{slide}.h5", FeatureBag(slide, x, [str(t) for t in range(n)], attrs={"encoder": "toy"}))
            rows.append({"slide": slide, "patient": patient, "score": f"{target[i]:.6f}",
                         "split": "test" if i >= n_patients - split_test else "train"})
    table = root / "cohort.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide", "patient", "score", "split"])
        w.writeheader()
        w.writerows(rows)
    return table, feats_dir, truth


def read_oof(out: Path) -> list[dict[str, str]]:
    with open(out / "oof_predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression_cv")
    table, feats, truth = write_regression_cohort(root)
    out = root / "cv"
    args = ["crossval", "--table", str(table), "--features", str(feats), "--task", "regression", "--target", "score",
            "--folds", "4", "--seeds", "0,1", "--out", str(out), "--epochs", "25", *FAST]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return table, out, truth, result.output, args


def test_out_of_fold_predictions_learn_the_target(regression_run) -> None:
    _, out, truth, output, _ = regression_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "regression" and m["target"] == "score" and m["loss"] == "mse"
    assert len(m["per_fold"]) == 8 and m["seeds"] == [0, 1]
    for fold in m["per_fold"]:
        ci = fold["metrics"]["ci"]
        assert ci["mae"]["low"] <= fold["metrics"]["mae"] <= ci["mae"]["high"]
        assert (out / fold["dir"] / "model.pt").is_file() and (out / fold["dir"] / "predictions_test.csv").is_file()
    oof = read_oof(out)
    for seed in (0, 1):
        rows = [r for r in oof if r["seed"] == str(seed)]
        assert sorted(r["patient"] for r in rows) == sorted(truth)  # every patient once per seed
        assert all(float(r["y_true"]) == truth[r["patient"]] for r in rows)
        pooled = m["pooled"][f"seed-{seed}"]
        expect = regression_scores(np.array([float(r["y_true"]) for r in rows]), np.array([float(r["prediction"]) for r in rows]))
        for name in ("mae", "rmse", "r2", "pearson", "spearman"):
            assert pooled[name]["value"] == pytest.approx(expect[name])
            assert pooled[name]["low"] <= pooled[name]["value"] <= pooled[name]["high"]
        assert pooled["r2"]["value"] > 0.4 and pooled["spearman"]["value"] > 0.8, pooled
    assert m["mean_over_seeds"]["r2"]["n"] == 2 and m["mean_over_seeds"]["r2"]["mean"] > 0.4
    assert m["mean_over_folds"]["r2"]["n"] == 8
    assert (out / "scatter_oof.png").stat().st_size > 1000 and m["files"]["ensemble"] == "ensemble.pt"
    ens = read_checkpoint_dict(out / "ensemble.pt")
    assert ens["model_name"] == "ensemble_mean_value" and len(ens["extra"]["members"]) == 8
    assert json.loads((out / "config.json").read_text())["task"] == "regression"
    assert "target 'score' (regression)" in output and "mean ± sd over seeds" in output


def test_folds_are_patient_grouped_and_stratified_on_the_target(regression_run) -> None:
    _, out, truth, _, _ = regression_run
    low, high = np.quantile(list(truth.values()), [0.25, 0.75])
    for seed in (0, 1):
        folds = json.loads((out / f"seed-{seed}" / "folds.json").read_text())["folds"]
        assert sorted(p for f in folds for p in f["test"]) == sorted(truth)  # tested once: never in two folds
        for f in folds:
            assert not set(f["test"]) & (set(f["train"]) | set(f["val"])) and not set(f["train"]) & set(f["val"])
            values = [truth[p] for p in f["test"]]
            assert min(values) < low and max(values) > high  # every fold tests low and high targets


def test_shuffled_targets_leave_no_signal(tmp_path) -> None:
    rng = np.random.default_rng(7)  # the generator's draws: seed 7's shuffled targets barely follow the tiles
    fraction = rng.uniform(0, 1, size=40)
    assert abs(np.corrcoef(fraction, rng.permutation(fraction))[0, 1]) < 0.1
    table, feats, _ = write_regression_cohort(tmp_path, seed=7, shuffle=True)
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, ["crossval", "--table", str(table), "--features", str(feats), "--task", "regression",
                                      "--target", "score", "--folds", "4", "--out", str(out), "--epochs", "25", *FAST])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["pooled"]["seed-0"]["r2"]["value"] < 0.15


def test_a_rerun_skips_finished_folds_and_refuses_changed_settings(regression_run, tmp_path) -> None:
    table, out, _, _, args = regression_run
    before = json.loads((out / "metrics.json").read_text())
    oof_before = (out / "oof_predictions.csv").read_text()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, skipped") == 8
    after = json.loads((out / "metrics.json").read_text())
    for key in ("per_fold", "pooled", "mean_over_folds", "mean_over_seeds"):
        assert after[key] == before[key]
    assert (out / "oof_predictions.csv").read_text() == oof_before
    refused = CliRunner().invoke(app, [*args, "--loss", "huber"])
    assert refused.exit_code == 2 and "loss changed" in refused.output, refused.output
    changed = tmp_path / "changed.csv"
    changed.write_text(table.read_text().replace("P000-S0,P000,", "P000-S0,P000,1"))
    refused = CliRunner().invoke(app, [a if a != str(table) else str(changed) for a in args])
    assert refused.exit_code == 2 and "the cohort table changed" in refused.output, refused.output


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory):
    """A huber cross-validation of 18 patients, 6 more held out (split ``test``): (table, features, truth, cv/)."""
    root = tmp_path_factory.mktemp("regression_holdout")
    table, feats, truth = write_regression_cohort(root, n_patients=24, seed=1, split_test=6)
    out = root / "cv"
    result = CliRunner().invoke(app, ["crossval", "--table", str(table), "--features", str(feats), "--task", "regression",
                                      "--target", "score", "--loss", "huber", "--folds", "3", "--out", str(out),
                                      "--epochs", "8", *FAST])
    assert result.exit_code == 0, result.output
    return table, feats, truth, out


def test_huber_loss_and_held_out_patients(holdout_run) -> None:
    table, feats, truth, out = holdout_run
    m = json.loads((out / "metrics.json").read_text())
    held = sorted(truth)[-6:]
    assert m["loss"] == "huber" and m["n_holdout_patients"] == 6 and m["holdout"]["n_patients"] == 6
    assert {"mae", "r2", "spearman", "ci"} <= set(m["holdout"])
    assert not set(held) & {r["patient"] for r in read_oof(out)}
    for f in json.loads((out / "seed-0" / "folds.json").read_text())["folds"]:
        assert not set(held) & set(f["train"] + f["val"] + f["test"])
    # held out: ensemble.pt predicts what the mean of the fold models' own predictions was before it
    cohort = match_feature_files(read_cohort(table, "score", numeric=True), feats)
    source = CohortSource(cohort, "patient", load_slide_features(cohort))
    names, mean_rows = mean_fold_outputs(out, m["per_fold"], source, source.bags(held))
    with open(out / "holdout_predictions.csv", newline="") as fh:
        written = {r["bag_id"]: float(r["prediction"]) for r in csv.DictReader(fh)}
    assert sorted(written) == sorted(names) == held and m["files"]["holdout_predictions"] == "holdout_predictions.csv"
    np.testing.assert_allclose([written[p] for p in names], mean_rows[:, 0], rtol=0, atol=1e-6)
    expect = regression_scores(np.array([truth[p] for p in names]), mean_rows[:, 0])
    assert m["holdout"]["mae"] == pytest.approx(expect["mae"], abs=1e-6) and m["holdout"]["model"].startswith("ensemble.pt")


def test_evaluate_table_scores_fold_models_and_ensemble_on_held_out_patients(holdout_run, tmp_path) -> None:
    table, feats, truth, cv = holdout_run
    s = evaluate_cohort(cv, table, feats, "score", tmp_path / "ev", n_resamples=40)
    assert s["task"] == "regression" and s["n_patients"] == 6 and s["bag_level"] == "patient"
    assert list(s["models"]) == ["fold-0-0", "fold-0-1", "fold-0-2", "ensemble"]
    with open(cv / "holdout_predictions.csv", newline="") as fh:
        crossval_rows = {r["bag_id"]: float(r["prediction"]) for r in csv.DictReader(fh)}
    for name, m in s["models"].items():
        with open(tmp_path / "ev" / f"predictions_{name}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["patient"] for r in rows] == sorted(truth)[-6:]  # the held-out patients only
        y, pred = np.array([float(r["y_true"]) for r in rows]), np.array([float(r["prediction"]) for r in rows])
        assert y.tolist() == [truth[r["patient"]] for r in rows]
        expect = regression_metrics(y, pred, n_resamples=40, seed=0)  # recomputed from the written predictions
        for k in ("mae", "rmse", "r2", "pearson", "spearman"):
            assert m[k] == pytest.approx(expect[k]["value"]) and m["ci"][k]["low"] == pytest.approx(expect[k]["low"])
    ens = {r: v for r, v in zip(sorted(truth)[-6:], _column(tmp_path / "ev" / "predictions_ensemble.csv", "prediction"))}
    np.testing.assert_allclose([ens[p] for p in crossval_rows], list(crossval_rows.values()), rtol=0, atol=1e-6)
    folds = [s["models"][f"fold-0-{i}"]["r2"] for i in range(3)]
    assert s["fold_models_mean"]["r2"]["mean"] == pytest.approx(np.mean(folds)) and s["fold_models_mean"]["r2"]["n"] == 3
    assert (tmp_path / "ev" / "scatter.png").stat().st_size > 1000 and s["files"]["scatter_model"] == "ensemble"
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "| ensemble | 6 |" in md and "fold models, mean ± sd" in md and "spearman" in md


def _column(path: Path, name: str) -> list[float]:
    with open(path, newline="") as fh:
        return [float(r[name]) for r in csv.DictReader(fh)]


def test_evaluate_table_regression_errors_are_one_line(holdout_run, tmp_path) -> None:
    table, feats, _, cv = holdout_run
    base = ["evaluate", str(cv), "--table", str(table), "--features", str(feats), "--out", str(tmp_path / "o")]
    cases = [
        (["--target", "score", "--classes", "a,b"], "--classes does not apply to regression models"),
        (["--target", "score", "--time", "score"], "--time applies to survival models; these are regression models"),
        (["--event", "score"], "--event applies to survival models"),
        (["--target", "score", "--task", "survival"], "the model was trained for regression, not survival"),
        (["--target", "score", "--threshold", "0.3"], "--threshold applies to classifiers, not these regression models"),
        (["--target", "split"], "target 'test' of patient P018 (column 'split') is not a finite number"),  # held out only
    ]
    lines = table.read_text().splitlines()
    assert lines[-1].startswith("P023-S1,P023,")
    lines[-1] = "P023-S1,P023,0.5,test"  # P023's two slides disagree
    (tmp_path / "two.csv").write_text("\n".join(lines) + "\n")
    cases.append((["--target", "score", "--table", str(tmp_path / "two.csv")], "patient 'P023' has conflicting value (score)"))
    for extra, msg in cases:
        result = CliRunner().invoke(app, base + extra)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and msg in lines[0], result.output
    ok = CliRunner().invoke(app, base + ["--target", "score", "--bootstrap", "0", "--task", "regression"])
    assert ok.exit_code == 0 and "| ensemble | 6 |" in ok.output, ok.output


def _with_value(table: Path, dest: Path, row: int, value: str) -> Path:
    lines = table.read_text().splitlines()
    lines[row] = ",".join(lines[row].split(",")[:2] + [value] + lines[row].split(",")[3:])
    dest.write_text("\n".join(lines) + "\n")
    return dest


def test_regression_input_errors_are_one_line(tmp_path) -> None:
    table, feats, _ = write_regression_cohort(tmp_path, n_patients=12)
    # data line 1 is P000's only slide; lines 2-3 are P001's two slides
    cases = [
        (_with_value(table, tmp_path / "text.csv", 1, "high"), [], "line 2: target 'high' of patient P000 (column 'score') is not a finite number"),
        (_with_value(table, tmp_path / "inf.csv", 1, "inf"), [], "line 2: target 'inf' of patient P000"),
        (_with_value(table, tmp_path / "two.csv", 2, "7.5"), [], "patient 'P001' has conflicting value (score): '7.5' on line 3"),
        (table, ["--classes", "a,b"], "--classes does not apply to --task regression"),
        (table, ["--time", "score"], "--time does not apply to --task regression"),
        (table, ["--event", "score"], "--event does not apply to --task regression"),
        (table, ["--loss", "hinge"], "unknown loss 'hinge'"),
    ]
    runner = CliRunner()
    for i, (path, extra, msg) in enumerate(cases):
        result = runner.invoke(app, ["crossval", "--table", str(path), "--features", str(feats), "--task", "regression",
                                     "--target", "score", "--folds", "3", *extra, "--out", str(tmp_path / f"cv{i}")])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and msg in lines[0], result.output
        assert path == table or f"{path}: " in lines[0]  # a bad value names the file


def test_quantile_strata_keep_folds_worth_of_patients_per_bin() -> None:
    values = np.random.default_rng(0).uniform(size=40)
    strata = quantile_strata(values, 5)
    assert np.bincount(strata).tolist() == [5] * 8  # 8 bins of 5, in the order of the values
    assert np.all(np.diff(strata[np.argsort(values)]) >= 0)
    tied = quantile_strata([0.0] * 30 + [1.0] * 5 + [2.0] * 5, 5)
    assert np.bincount(tied).tolist() == [30, 5, 5]  # tied values merge bins; each left holds >= 5
    assert quantile_strata([1.0, 2.0, 3.0], 5).tolist() == [0, 0, 0]  # too few for two bins: one


def test_few_patients_one_stratum_and_slide_bags(tmp_path) -> None:
    table, feats, truth = write_regression_cohort(tmp_path, n_patients=7)  # under 2 x folds: one quantile bin
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, ["crossval", "--table", str(table), "--features", str(feats), "--task", "regression",
                                      "--target", "score", "--folds", "3", "--bag-level", "slide", "--out", str(out),
                                      "--epochs", "2", *FAST])
    assert result.exit_code == 0, result.output
    oof = read_oof(out)
    assert sorted(r["patient"] for r in oof) == sorted(truth)  # slide predictions averaged: one row per patient
    assert {r["slides"] for r in oof if r["patient"] == "P001"} == {"P001-S0;P001-S1"}


def test_report_of_a_regression_crossval_shows_metrics_json_and_its_scatter(holdout_run) -> None:
    out = holdout_run[3]
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    m = json.loads((out / "metrics.json").read_text())
    for name, metric in m["pooled"]["seed-0"].items():
        if isinstance(metric, dict):
            assert f"{metric['value']:.3f}" in page and f"[{metric['low']:.3f}, {metric['high']:.3f}]" in page, name
    for name in ("mae", "r2", "spearman"):
        assert f"{m['mean_over_folds'][name]['mean']:.3f} ± {m['mean_over_folds'][name]['std']:.3f}" in page
        assert f"{m['holdout'][name]:.3f}" in page  # the ensemble's held-out row
    assert "held out" in page and "regression" in page
    assert page.count("<img") == len(list(out.glob("*.png")) + list(out.glob("seed-*/fold-*/*.png"))) >= 1
    assert page.count("data:image/png;base64,") == page.count("<img")

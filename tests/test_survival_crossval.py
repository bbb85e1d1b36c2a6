"""Survival cross-validation of a slide cohort through the CLI: folds stratified on the event and grouped
by patient, c-index per fold and pooled in metrics.json near the oracle, ``evaluate --table`` scoring each
fold model against its stored training data and their mean risk, one-line errors for bad inputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histomil.cli import app
from histomil.evaluation.cohort_evaluate import evaluate_cohort
from histomil.evaluation.cohort_evaluate_targets import combined_cut
from histomil.evaluation.survival import (
    cindex_harrell,
    survival_metrics,
    survival_targets,
)
from histomil.evaluation.survival_report import held_out_times, stored_reference
from histomil.features.store import FeatureBag, write_feature_bag
from histomil.training.checkpoint import read_checkpoint_dict

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


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_table_scores_each_fold_model_and_their_mean_risk(survival_run, tmp_path) -> None:
    table, out, truth, _, _ = survival_run
    s = evaluate_cohort(out, table, table.parent / "features", "dead", tmp_path / "ev", n_resamples=5, time="os_months")
    assert s["task"] == "survival" and s["n_patients"] == 60 and s["time"] == "os_months" and s["event"] == "dead"
    assert list(s["models"]) == [f"fold-0-{i}" for i in range(4)] + ["mean_risk"]
    oof = {r["patient"]: (r["fold"], float(r["risk"])) for r in _rows(out / "oof_predictions.csv")}
    risks, medians = [], []
    for i in range(4):
        m = s["models"][f"fold-0-{i}"]
        rows = _rows(tmp_path / "ev" / f"predictions_fold-0-{i}.csv")
        assert sorted(r["patient"] for r in rows) == sorted(truth)
        targets = survival_targets([float(r["time"]) for r in rows], [int(r["event"]) for r in rows])
        risk = np.array([float(r["risk"]) for r in rows])
        # its c-index, recomputed by hand against its stored training data (censoring and median)
        ref = stored_reference(read_checkpoint_dict(out / f"seed-0/fold-{i}/model.pt")["extra"]["survival_train"], "fold")
        assert ref is not None and m["reference"]["n_train_events"] == int(ref.targets.event.sum())
        times = held_out_times(ref.targets, targets)
        expect = survival_metrics(targets, risk, ref.targets, times, ref.breslow(risk, times))
        for k in ("cindex_harrell", "cindex_uno", "td_auc", "ibs"):
            assert m[k] == pytest.approx(expect[k]), k
        assert m["ci"]["cindex_harrell"]["low"] <= m["cindex_harrell"] <= m["ci"]["cindex_harrell"]["high"]
        assert m["risk_groups"]["cut"] == ref.median_risk and m["risk_groups"]["cut_from"] == "training median risk"
        # the fold's own test patients get the risks the cross-validation gave them
        mine = [(r["patient"], float(r["risk"])) for r in rows if oof[r["patient"]][0] == str(i)]
        np.testing.assert_allclose([v for _, v in mine], [oof[p][1] for p, _ in mine], rtol=0, atol=1e-6)
        risks.append(dict(zip([r["patient"] for r in rows], risk)))
        medians.append(ref.median_risk)
    mean = {r["patient"]: float(r["risk"]) for r in _rows(tmp_path / "ev" / "predictions_mean_risk.csv")}
    np.testing.assert_allclose([mean[p] for p in truth], [np.mean([r[p] for r in risks]) for p in truth], atol=1e-12)
    assert s["km"]["model"] == "mean_risk" and s["km"]["cut_from"] == "mean of the fold models' training median risks"
    assert s["km"]["cut"] == pytest.approx(np.mean(medians)) and (tmp_path / "ev" / "km.png").stat().st_size > 1000
    assert s["fold_models_mean"]["cindex_harrell"]["n"] == 4 and s["models"]["mean_risk"]["cindex_harrell"] > 0.6
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "| mean_risk | 60 |" in md and "fold models, mean ± sd" in md and "cindex_uno" in md
    # without every fold model's training median, the evaluated patients' own median splits the groups
    cut, cut_from, why = combined_cut([ref, None], np.array([0.0, 1.0, 2.0]))
    assert (cut, cut_from) == (1.0, "evaluated patients' median risk") and "stores no training median" in why


def test_evaluate_table_survival_errors_are_one_line(survival_run, tmp_path) -> None:
    table, out, _, _, _ = survival_run
    base = ["evaluate", str(out), "--table", str(table), "--features", str(table.parent / "features"), "--out", str(tmp_path / "o")]
    cases = [
        (["--event", "dead"], "survival models need --time"),
        (["--time", "os_months", "--event", "dead", "--classes", "0,1"], "--classes does not apply to survival models"),
        (["--time", "os_months", "--event", "dead", "--task", "regression"], "trained for survival, not regression"),
        (["--time", "os_months", "--event", "dead", "--target", "os_months"], "give --event or --target, not both"),
        (["--time", "dead", "--event", "dead"], "is not a number above 0"),
    ]
    for extra, msg in cases:
        result = CliRunner().invoke(app, base + extra)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and msg in lines[0], result.output
    result = CliRunner().invoke(app, ["evaluate", str(out / "seed-0" / "fold-0" / "model.pt"), str(tmp_path),
                                      "--time", "os_months", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--time and --event go with --table" in result.output, result.output


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


def test_report_of_a_survival_crossval_shows_metrics_json_and_km_plots(survival_run) -> None:
    out = survival_run[1]
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    m = json.loads((out / "metrics.json").read_text())
    for name, metric in m["pooled"]["seed-0"].items():
        if isinstance(metric, dict) and "value" in metric:
            assert f"{metric['value']:.3f}" in page and f"[{metric['low']:.3f}, {metric['high']:.3f}]" in page, name
    c = m["mean_over_folds"]["cindex_harrell"]
    assert f"{c['mean']:.3f} ± {c['std']:.3f}" in page and "survival" in page
    pngs = list(out.glob("*.png")) + list(out.glob("seed-*/fold-*/*.png"))
    assert any(p.name.startswith("km_pooled") for p in pngs) and any(p.name == "km_test.png" for p in pngs)
    assert page.count("<img") == len(pngs) == page.count("data:image/png;base64,")
    wrong = CliRunner().invoke(app, ["report", str(out), "--task", "regression", "--out", str(out / "never.html")])
    assert wrong.exit_code == 2 and "a survival cross-validation, not regression" in wrong.output

"""Cohort cross-validation: patient-grouped folds, thresholds from validation patients only, resume, CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cohort_data import write_cohort
from typer.testing import CliRunner

import histomil.evaluation.cohort_cv as cohort_cv
from histomil.cli import app
from histomil.errors import HistomilError
from histomil.evaluation.cohort_cv import CohortCVConfig, run_cohort_crossval
from histomil.evaluation.metrics import binary_metrics
from histomil.evaluation.splitting import check_no_leak
from histomil.training.checkpoint import load_checkpoint, read_checkpoint_dict
from histomil.training.trainer import predict

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = {"epochs": 12, "min_epochs": 3, "patience": 4, "lr": 2e-3, "threads": 1,
         "model_kwargs": {"embed_dim": 32, "attn_dim": 16}}


def config(table: Path, feats: Path, **kw) -> CohortCVConfig:
    return CohortCVConfig.model_validate({"table": table, "features": feats, "target": "label", "folds": 3,
                                          "bootstrap_resamples": 200, "train": TRAIN, **kw})


class Spies:
    """Counts training runs and records the bags each threshold was fitted on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trained: list[list[str]] = []
        self.fitted: list[list[str]] = []
        real_train, real_fit = cohort_cv.train, cohort_cv.fit_threshold

        def train(train_bags, val_bags, *args, **kwargs):
            self.trained.append([b.bag_id for b in train_bags])
            return real_train(train_bags, val_bags, *args, **kwargs)

        def fit(model_path, val_bags, rule):
            self.fitted.append([b.bag_id for b in val_bags])
            return real_fit(model_path, val_bags, rule)

        monkeypatch.setattr(cohort_cv, "train", train)
        monkeypatch.setattr(cohort_cv, "fit_threshold", fit)


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort_cv")
    table, feats, slides_of = write_cohort(root)
    with pytest.MonkeyPatch.context() as mp:
        spies = Spies(mp)
        lines: list[str] = []
        cfg = config(table, feats)
        summary = run_cohort_crossval(cfg, root / "cv", log=lines.append)
    return root, cfg, summary, spies, slides_of, lines


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_patients_never_in_two_folds_and_bags_hold_all_their_slides(cohort_run):
    root, _, summary, spies, slides_of, _ = cohort_run
    tested: list[str] = []
    for f in range(3):
        rec = json.loads((root / "cv" / "seed-0" / f"fold-{f}" / "metrics.json").read_text())
        roles = rec["patients"]
        check_no_leak(roles)
        assert sorted(roles["train"] + roles["val"] + roles["test"]) == sorted(slides_of)
        tested += roles["test"]
        assert rec["slides"] == {p: slides_of[p] for p in roles["test"]}  # a test patient's bag: all its slides
        # the model was trained on this fold's training patients only, one bag per patient
        assert spies.trained[f] == roles["train"]
    assert sorted(tested) == sorted(slides_of)  # every patient tested exactly once
    assert summary["n_patients"] == 12 and summary["n_slides"] == sum(map(len, slides_of.values()))


def test_threshold_is_fitted_on_validation_patients_only(cohort_run):
    root, _, _, spies, _, _ = cohort_run
    assert len(spies.fitted) == 3
    for f, bag_ids in enumerate(spies.fitted):
        rec = json.loads((root / "cv" / "seed-0" / f"fold-{f}" / "metrics.json").read_text())
        assert bag_ids == rec["patients"]["val"]  # nothing of the test fold, nothing of training
        assert read_checkpoint_dict(root / "cv" / "seed-0" / f"fold-{f}" / "model.pt")["extra"]["threshold"] == rec["threshold"]
        assert rec["test_sets"]["test"]["threshold"] == rec["threshold"]


def test_out_of_fold_predictions_and_metrics(cohort_run):
    root, _, summary, _, slides_of, _ = cohort_run
    rows = read_csv(root / "cv" / "oof_predictions.csv")
    assert list(rows[0]) == ["patient", "slides", "fold", "seed", "y_true", "label", "probability", "y_pred", "threshold"]
    assert sorted(r["patient"] for r in rows) == sorted(slides_of)
    for r in rows:
        assert r["slides"].split(";") == slides_of[r["patient"]]
        assert int(r["y_true"]) == int(r["patient"][1:]) % 2 and r["label"] == ("tumor" if int(r["y_true"]) else "normal")
        assert int(r["y_pred"]) == int(float(r["probability"]) >= float(r["threshold"]))
    y = np.array([int(r["y_true"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    assert binary_metrics(y, p)["roc_auc"] > 0.9  # the tumour tiles are easy to find
    pooled = summary["pooled"]["seed-0"]
    assert pooled["n_patients"] == 12 and pooled["roc_auc"]["value"] > 0.9
    assert pooled["roc_auc"]["low"] <= pooled["roc_auc"]["value"] <= pooled["roc_auc"]["high"]
    mean = summary["mean_over_folds"]["balanced_accuracy"]
    per_fold = [f["metrics"]["balanced_accuracy"] for f in summary["per_fold"]]
    assert mean["mean"] == pytest.approx(np.mean(per_fold)) and mean["std"] == pytest.approx(np.std(per_fold, ddof=1))
    for f in summary["per_fold"]:
        ci = f["metrics"]["ci"]["accuracy"]
        assert ci["low"] <= f["metrics"]["accuracy"] <= ci["high"]
    assert summary["positive_class"] == "tumor" and summary["classes"] == ["normal", "tumor"]
    on_disk = json.loads((root / "cv" / "metrics.json").read_text())
    assert on_disk["pooled"] == json.loads(json.dumps(summary["pooled"]))
    for name in ("config.json", "crossval.json", "crossval.md", "report.html", "roc_pr.png"):
        assert (root / "cv" / name).is_file(), name
    html = (root / "cv" / "report.html").read_text()
    assert "per run" in html.lower()
    assert "Patient-level metrics" in html and "Bag-level" not in html  # the bags of this cross-validation are patients
    for f in range(3):
        fold = root / "cv" / "seed-0" / f"fold-{f}"
        assert (fold / "model.pt").is_file() and (fold / "history.csv").is_file() and not (fold / "last.pt").exists()


def test_ensemble_combines_the_fold_models(cohort_run):
    root, cfg, _, _, _, _ = cohort_run
    from histomil.data.cohort import cohort_bags, match_feature_files, read_cohort

    model, meta = load_checkpoint(root / "cv" / "ensemble.pt")
    assert meta["model_name"] == "ensemble" and len(meta["extra"]["members"]) == 3
    thresholds = [json.loads((root / "cv" / "seed-0" / f"fold-{f}" / "metrics.json").read_text())["threshold"] for f in range(3)]
    assert meta["threshold"] == pytest.approx(np.mean(thresholds))
    bags = cohort_bags(match_feature_files(read_cohort(cfg.table, "label"), cfg.features))
    probs = np.array([p[1] for p, _ in predict(model, bags)])
    members = [load_checkpoint(root / "cv" / "seed-0" / f"fold-{f}" / "model.pt")[0] for f in range(3)]
    mean = np.mean([[p[1] for p, _ in predict(m, bags)] for m in members], axis=0)
    np.testing.assert_allclose(probs, mean, atol=1e-5)  # the mean probability of the fold models


def test_resume_skips_finished_folds_and_refuses_changes(cohort_run, tmp_path, monkeypatch):
    root, cfg, summary, _, _, _ = cohort_run
    cfg = cfg.model_copy(update={"report": False})  # a setting that may change on resume (no fold depends on it)
    run = tmp_path / "cv"
    shutil.copytree(root / "cv", run)
    spies = Spies(monkeypatch)
    lines: list[str] = []
    again = run_cohort_crossval(cfg, run, log=lines.append)
    assert spies.trained == [] and sum("finished earlier, skipped" in ln for ln in lines) == 3
    assert again["pooled"] == summary["pooled"]
    # a fold without metrics.json (killed) is redone, with the same result
    before = read_csv(run / "seed-0" / "fold-1" / "predictions_test.csv")
    (run / "seed-0" / "fold-1" / "metrics.json").unlink()
    redo = run_cohort_crossval(cfg, run, log=lines.append)
    assert len(spies.trained) == 1
    assert read_csv(run / "seed-0" / "fold-1" / "predictions_test.csv") == before
    assert redo["pooled"] == summary["pooled"]
    # a changed setting, or a changed table, is refused, naming what changed
    with pytest.raises(HistomilError, match=r"different config \(val_fraction changed\)"):
        run_cohort_crossval(cfg.model_copy(update={"val_fraction": 0.3}), run, log=lines.append)
    text = cfg.table.read_text().replace("P00-S0,P00,normal", "P00-S0,P00,tumor")
    changed = tmp_path / "changed.csv"
    changed.write_text(text)
    with pytest.raises(HistomilError, match=r"the cohort table changed .* use another output folder"):
        run_cohort_crossval(cfg.model_copy(update={"table": changed}), run, log=lines.append)


def test_slide_level_bags_average_slides_per_patient(tmp_path, monkeypatch):
    table, feats, slides_of = write_cohort(tmp_path, n_patients=9, seed=3)
    spies = Spies(monkeypatch)
    cfg = config(table, feats, bag_level="slide", bootstrap_resamples=0, report=False, seeds=[0, 1])
    summary = run_cohort_crossval(cfg, tmp_path / "cv", log=lambda _m: None)
    rec = json.loads((tmp_path / "cv" / "seed-0" / "fold-0" / "metrics.json").read_text())
    assert spies.trained[0] == [s for p in rec["patients"]["train"] for s in slides_of[p]]  # one bag per slide
    assert spies.fitted[0] == [s for p in rec["patients"]["val"] for s in slides_of[p]]
    rows = read_csv(tmp_path / "cv" / "oof_predictions.csv")
    for seed in ("0", "1"):  # still one prediction per patient, in every seed
        assert sorted(r["patient"] for r in rows if r["seed"] == seed) == sorted(slides_of)
    assert summary["bag_level"] == "slide" and [p["n_patients"] for p in summary["pooled"].values()] == [9, 9]
    folds = [json.loads((tmp_path / "cv" / f"seed-{s}" / "folds.json").read_text())["folds"] for s in (0, 1)]
    assert folds[0] != folds[1] and len(summary["per_fold"]) == 6  # each seed draws its own patient folds


def test_three_classes_and_held_out_patients(tmp_path):
    table, feats, _ = write_cohort(tmp_path, n_patients=15, seed=5)
    rows = table.read_text().splitlines()
    out_rows = ["slide,patient,grade,split"]
    for r in rows[1:]:
        slide, patient, _ = r.split(",")
        i = int(patient[1:])
        out_rows.append(f"{slide},{patient},{'G' + str(i % 3 + 1)},{'test' if i >= 12 else 'train'}")
    t = tmp_path / "grades.csv"
    t.write_text("\n".join(out_rows) + "\n")
    cfg = CohortCVConfig.model_validate({"table": t, "features": feats, "target": "grade", "folds": 2,
                                         "bootstrap_resamples": 50, "train": {**TRAIN, "epochs": 3}})
    summary = run_cohort_crossval(cfg, tmp_path / "cv", log=lambda _m: None)
    assert summary["classes"] == ["G1", "G2", "G3"] and summary["positive_class"] is None
    oof = read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert list(oof[0])[6:9] == ["prob_G1", "prob_G2", "prob_G3"] and len(oof) == 12  # held-out patients not in folds
    for r in oof:
        probs = [float(r[f"prob_G{k}"]) for k in (1, 2, 3)]
        assert sum(probs) == pytest.approx(1.0) and int(r["y_pred"]) == int(np.argmax(probs))
    assert set(summary["mean_over_folds"]) == {"accuracy", "balanced_accuracy", "macro_roc_auc", "macro_pr_auc", "f1_macro"}
    assert summary["holdout"]["n_patients"] == 3 and summary["holdout"]["model"] == "ensemble.pt"
    assert len(read_csv(tmp_path / "cv" / "holdout_predictions.csv")) == 3
    # evaluate --table on the held-out patients scores the fold models and the ensemble with multi-class metrics
    from histomil.evaluation.cohort_evaluate import evaluate_cohort

    ev = evaluate_cohort(tmp_path / "cv", t, feats, "grade", tmp_path / "ev", n_resamples=20)
    assert set(ev["models"]) == {"fold-0-0", "fold-0-1", "ensemble"}
    assert all("macro_roc_auc" in m and "f1_macro" in m for m in ev["models"].values())
    assert ev["fold_models_mean"]["balanced_accuracy"]["n"] == 2
    table_md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "macro_roc_auc" in table_md and "f1_macro" in table_md


runner = CliRunner()


def test_cli_interface(tmp_path):
    table, feats, _ = write_cohort(tmp_path)
    args = ["crossval", "--table", table, "--features", feats, "--target", "label", "--folds", "3", "--out", tmp_path / "cv",
            "--epochs", "12", "--set", "train.min_epochs=3", "--set", "train.lr=2e-3", "--set", "bootstrap_resamples=100",
            "--set", "report=false"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "positive class 'tumor'" in result.output and "| pooled, seed-0 |" in result.output
    metrics = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    assert metrics["pooled"]["seed-0"]["roc_auc"]["value"] > 0.9
    assert json.loads((tmp_path / "cv" / "config.json").read_text())["train"]["lr"] == 2e-3
    assert (tmp_path / "cv" / "crossval.md").is_file() and not (tmp_path / "cv" / "report.html").exists()
    # one-line errors, no traceback
    for bad, message in [
        (["crossval", "--table", table, "--features", feats, "--out", tmp_path / "x"], "--target missing"),
        (["crossval", table, "--table", table, "--out", tmp_path / "x"], "a tile-study config takes no --table"),
        (["crossval", "--table", table, "--features", feats, "--target", "nope", "--out", tmp_path / "x"], "no 'nope' column"),
        (["crossval", "--table", table, "--features", feats, "--target", "label", "--bag-level", "tile", "--out", tmp_path / "x"],
         "bag_level"),
    ]:
        result = runner.invoke(app, [str(a) for a in bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_cli_two_tables_classes_and_skipped_slides(tmp_path):
    table, feats, slides_of = write_cohort(tmp_path, n_patients=10, seed=7)
    slides = tmp_path / "slides.csv"
    slides.write_text("slide,PATIENT_ID\n" + "".join(f"{s},{p}\n" for p, ss in slides_of.items() for s in ss) + "lost-slide,P03\n")
    clinical = tmp_path / "clinical.csv"
    clinical.write_text("PATIENT_ID,status\n" + "".join(f"{p},{'tumor' if int(p[1:]) % 2 else 'normal'}\n" for p in slides_of))
    args = ["crossval", "--table", slides, "--clinical-table", clinical, "--features", feats, "--target", "status",
            "--patient-column", "patient_id", "--classes", "tumor,normal", "--folds", "2", "--epochs", "2",
            "--out", tmp_path / "cv", "--set", "report=false", "--set", "bootstrap_resamples=0"]
    result = runner.invoke(app, [str(a) for a in args])
    line = sum(map(len, slides_of.values())) + 2
    assert result.exit_code == 2 and f"have no feature file in {feats}: lost-slide (line {line})" in " ".join(result.output.split())
    result = runner.invoke(app, [str(a) for a in args + ["--on-missing", "skip"]])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "lost-slide" in result.output
    metrics = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    assert metrics["classes"] == ["tumor", "normal"] and metrics["positive_class"] == "normal"
    assert metrics["n_slides"] == sum(map(len, slides_of.values()))
    oof = read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert all(int(r["y_true"]) == (0 if r["label"] == "tumor" else 1) for r in oof)

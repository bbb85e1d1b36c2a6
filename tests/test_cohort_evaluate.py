"""External validation on a cohort table: every fold model and the ensemble, patient level, with intervals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cohort_data import write_cohort
from typer.testing import CliRunner

from histomil.cli import app
from histomil.data.cohort import read_cohort
from histomil.errors import HistomilError
from histomil.evaluation.cohort_cv import CohortCVConfig, run_cohort_crossval
from histomil.evaluation.cohort_evaluate import evaluate_cohort, find_models, patients_to_evaluate
from histomil.evaluation.metrics import binary_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = {"epochs": 12, "min_epochs": 3, "patience": 4, "lr": 2e-3, "threads": 1,
         "model_kwargs": {"embed_dim": 32, "attn_dim": 16}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort_eval")
    table, feats, _ = write_cohort(root / "dev", n_patients=12, seed=0)
    cfg = CohortCVConfig.model_validate({"table": table, "features": feats, "target": "label", "folds": 2,
                                         "bootstrap_resamples": 0, "train": TRAIN})
    run_cohort_crossval(cfg, root / "cv", log=lambda _: None)
    ext_table, ext_feats, ext_slides = write_cohort(root / "external", n_patients=10, seed=7)
    return root, ext_table, ext_feats, ext_slides


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_fold_model_and_the_ensemble_on_an_external_cohort(trained):
    root, table, feats, slides_of = trained
    s = evaluate_cohort(root / "cv", table, feats, "label", root / "ev", n_resamples=300)
    assert list(s["models"]) == ["fold-0-0", "fold-0-1", "ensemble"]
    assert s["n_patients"] == 10 and s["n_slides"] == sum(len(v) for v in slides_of.values())
    assert s["classes"] == ["normal", "tumor"] and s["bag_level"] == "patient"
    for name, m in s["models"].items():
        rows = _rows(root / "ev" / f"predictions_{name}.csv")
        assert sorted(r["bag_id"] for r in rows) == sorted(slides_of)  # one row per patient
        y = np.array([int(r["y_true"]) for r in rows])
        assert y.tolist() == [int(r["bag_id"][1:]) % 2 for r in rows]  # odd patients are positive
        p = np.array([float(r["prob_positive"]) for r in rows])
        # the table's numbers are these predictions' metrics, at the threshold the model recorded
        assert m["roc_auc"] == pytest.approx(binary_metrics(y, p, m["threshold"])["roc_auc"])
        assert m["roc_auc"] >= 0.9 and m["ci"]["roc_auc"]["low"] <= m["roc_auc"] <= m["ci"]["roc_auc"]["high"]
    ens = json.loads((root / "cv" / "metrics.json").read_text())
    assert s["models"]["ensemble"]["threshold"] == pytest.approx(
        np.mean([f["threshold"] for f in ens["per_fold"]]))  # nothing fitted on the evaluated patients
    folds = [s["models"][n]["balanced_accuracy"] for n in ("fold-0-0", "fold-0-1")]
    assert s["fold_models_mean"]["balanced_accuracy"]["mean"] == pytest.approx(np.mean(folds))
    md = (root / "ev" / "metrics.md").read_text()
    assert "| ensemble | 10 |" in md and "fold models, mean ± sd" in md
    assert (root / "ev" / "roc_pr.png").stat().st_size > 0


def test_split_column_selects_the_held_out_patients(trained, tmp_path):
    root, table, feats, _ = trained
    rows = _rows(table)
    with open(tmp_path / "t.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "patient", "label", "split"])
        for r in rows:
            w.writerow([r["slide"], r["patient"], r["label"], "test" if r["patient"] in ("P00", "P01", "P02", "P03") else "train"])
    cohort = read_cohort(tmp_path / "t.csv", "label")
    assert patients_to_evaluate(cohort, "auto") == ["P00", "P01", "P02", "P03"]
    assert len(patients_to_evaluate(cohort, "all")) == 10
    s = evaluate_cohort(root / "cv" / "ensemble.pt", tmp_path / "t.csv", feats, "label", tmp_path / "ev", n_resamples=0)
    assert list(s["models"]) == ["model"] and s["n_patients"] == 4
    with pytest.raises(HistomilError, match="needs a split column"):
        patients_to_evaluate(read_cohort(table, "label"), "test")


def test_errors_are_one_line(trained, tmp_path):
    root, table, feats, _ = trained
    with pytest.raises(HistomilError, match="not a 'crossval --table' folder"):
        find_models(tmp_path)
    three = tmp_path / "three.csv"
    three.write_text("".join(line.replace(",tumor", ",grade3") if line.startswith("P09") else line
                             for line in table.read_text().splitlines(keepends=True)))
    with pytest.raises(HistomilError, match="not among the classes given"):
        evaluate_cohort(root / "cv", three, feats, "label", tmp_path / "ev")
    result = CliRunner().invoke(app, ["evaluate", str(root / "cv"), "--table", str(table), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--table needs --features" in result.output
    result = CliRunner().invoke(app, ["evaluate", str(root / "cv"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "or --table with --features and --target" in result.output


def test_cli_prints_the_table(trained, tmp_path):
    root, table, feats, _ = trained
    result = CliRunner().invoke(app, ["evaluate", str(root / "cv"), "--table", str(table), "--features", str(feats),
                                      "--target", "label", "--bootstrap", "100", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "| ensemble | 10 |" in result.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["bootstrap_resamples"] == 100

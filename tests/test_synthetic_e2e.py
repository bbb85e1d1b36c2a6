"""The whole slide-cohort path on a tiny synthetic cohort, through the command line:

synth-cohort -> tile -> features slides (EfficientNet-Lite0, CPU) -> crossval --table -> evaluate --table on
the held-out patients (with each patient bag's attention drawn on its slides) -> heatmap --features ->
localise against the known tumour tiles.

About 40 s of CPU time (most of it the encoder on ~200 tiles); real numbers are asserted: the patient
bags hold every slide, the held-out evaluation covers exactly the test patients, and attention finds the
tumour tiles (AUC well above chance) on held-out slides and out of fold. Three folds, not two: with 8
cross-validated patients, two folds leave 3 training patients and attention was learnt backwards in one fold.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histomil.cli import app
from histomil.data.cohort import cohort_bags, load_slide_features, match_feature_files, read_cohort
from histomil.evaluation.localisation import attention_by_slide, localise, read_truth
from histomil.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_e2e")
    synth, feats, cv = root / "synth", root / "feats", root / "cv"
    _run("synth-cohort", "--out", synth, "--patients", "12", "--grid-min", "3", "--grid-max", "4",
         "--multi-slide-fraction", "0.4", "--no-mpp-slides", "1", "--seed", "2")
    _run("tile", synth / "slides", "--out", root / "tiles", "--slide-mpp", "0.5")
    _run("features", "slides", synth / "slides", "--out", feats, "--coords", root / "tiles", "--slide-mpp", "0.5",
         "--precision", "fp32", "--runtime", "torch", "--workers", "0")
    _run("crossval", "--table", synth / "cohort.csv", "--features", feats, "--target", "label", "--folds", "3",
         "--epochs", "20", "--set", "train.threads=1", "--set", "bootstrap_resamples=200", "--out", cv)
    _run("evaluate", cv, "--table", synth / "cohort.csv", "--features", feats, "--target", "label",
         "--bootstrap", "200", "--slides", synth / "slides", "--slide-mpp", "0.5", "--out", root / "external")
    for row in _rows(synth / "cohort.csv"):
        if row["split"] == "test":
            _run("heatmap", cv / "ensemble.pt", synth / "slides" / f"{row['slide']}.tif", "--features", feats,
                 "--slide-mpp", "0.5", "--out", root / "heatmaps")
    _run("localise", synth / "truth.csv", root / "heatmaps", "--out", root / "localisation.json")
    _run("localise", synth / "truth.csv", root / "external" / "heatmaps", "--out", root / "localisation_patient.json")
    return root


def test_patient_bags_hold_all_their_slides(pipeline: Path) -> None:
    table = _rows(pipeline / "synth" / "cohort.csv")
    slides_of: dict[str, list[str]] = {}
    for r in table:
        slides_of.setdefault(r["patient"], []).append(r["slide"])
    assert max(len(s) for s in slides_of.values()) >= 2  # a multi-slide patient exists
    tested = []
    for fold in (0, 1, 2):
        rec = json.loads((pipeline / "cv" / "seed-0" / f"fold-{fold}" / "metrics.json").read_text())
        assert rec["slides"] == {p: slides_of[p] for p in rec["patients"]["test"]}
        tested += rec["patients"]["test"]
    held_out = sorted({r["patient"] for r in table if r["split"] == "test"})
    assert sorted(tested) == sorted(set(slides_of) - set(held_out))  # CV never sees the held-out patients
    ev = json.loads((pipeline / "external" / "metrics.json").read_text())
    assert ev["n_patients"] == len(held_out) and list(ev["models"]) == ["fold-0-0", "fold-0-1", "fold-0-2", "ensemble"]
    assert sorted(r["bag_id"] for r in _rows(pipeline / "external" / "predictions_ensemble.csv")) == held_out
    cohort = match_feature_files(read_cohort(pipeline / "synth" / "cohort.csv", "label"), pipeline / "feats")
    slide_bags = load_slide_features(cohort)
    for bag in cohort_bags(cohort, "patient", slide_bags):
        assert bag.attrs["slides"] == slides_of[bag.bag_id]
        assert len(bag) == sum(len(slide_bags[s]) for s in slides_of[bag.bag_id])


def test_attention_finds_the_tumour_tiles(pipeline: Path) -> None:
    held_out = json.loads((pipeline / "localisation.json").read_text())["summary"]
    assert held_out["n_tumour_slides"] >= 1
    assert held_out["auc_mean"] > 0.6  # the ensemble's heatmaps of the held-out slides (2 with tumour here)
    # the same slides drawn from the patient bags' attention (evaluate --slides): every held-out slide, scored alike
    patient = json.loads((pipeline / "localisation_patient.json").read_text())
    assert [r["slide"] for r in patient["slides"]] == [r["slide"] for r in json.loads(
        (pipeline / "localisation.json").read_text())["slides"]]
    assert patient["summary"]["auc_mean"] > 0.6
    # out of fold: each fold model's attention on its own test patients' slides
    truth = read_truth(pipeline / "synth" / "truth.csv")
    cohort = match_feature_files(read_cohort(pipeline / "synth" / "cohort.csv", "label"), pipeline / "feats")
    bags = {b.bag_id: b for b in cohort_bags(cohort, "patient")}
    rows = []
    for fold in (0, 1, 2):
        rec = json.loads((pipeline / "cv" / "seed-0" / f"fold-{fold}" / "metrics.json").read_text())
        model, _ = load_checkpoint(pipeline / "cv" / "seed-0" / f"fold-{fold}" / "model.pt")
        rows += localise(attention_by_slide(model, [bags[p] for p in rec["patients"]["test"]]), truth)[0]
    scored = [r["auc"] for r in rows if r["auc"] is not None]
    hits = [r["top1_hit"] for r in rows if r["top1_hit"] is not None]
    assert len(scored) >= 4 and sum(scored) / len(scored) > 0.75 and sum(hits) / len(hits) >= 0.5

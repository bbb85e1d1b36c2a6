"""The synthetic survival cohort: censoring solved exactly, times follow the stated hazard, and the
cohort is composed, encoded and written (table, flat feature folder) from real tiles."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from tiny_runs import FAST_ENCODER

from histomil.data.synthetic_survival import (
    SurvivalCohortSpec,
    censoring_rate,
    cohort_summary,
    draw_times,
    make_survival_cohort,
    read_survival_cohort,
)
from histomil.errors import HistomilError
from histomil.features.formats import load_feature_dataset
from histomil.pipeline import FeatureConfig
from histomil.resources import example_tile_table


def test_censoring_rate_gives_the_expected_fraction() -> None:
    hazards = np.array([0.1, 0.2, 0.5, 2.0])
    c = censoring_rate(hazards, 0.3)
    assert np.mean(c / (c + hazards)) == pytest.approx(0.3, abs=1e-9)
    assert censoring_rate(hazards, 0.0) == 0.0
    with pytest.raises(HistomilError, match="censoring"):
        censoring_rate(hazards, 1.0)


def test_times_follow_the_hazard_of_the_tumour_content() -> None:
    spec = SurvivalCohortSpec(beta=2.0, baseline_hazard=0.5, censoring=0.3)
    w = np.repeat([0, 40], 20_000)
    d = draw_times(w, spec, seed=0)
    assert d["log_hazard"][0] == pytest.approx(math.log(0.5)) and d["log_hazard"][-1] == pytest.approx(math.log(0.5) + 2.0)
    assert 1 - d["event"].mean() == pytest.approx(0.3, abs=0.01)
    # exponential event and censoring times: min(T, C) ~ Exp(hazard + c), mean 1 / (hazard + c)
    c = censoring_rate(np.exp(d["log_hazard"]), 0.3)
    for k, h in ((0, 0.5), (40, 0.5 * math.e**2)):
        assert d["time"][w == k].mean() == pytest.approx(1 / (h + c), rel=0.03)
    again = draw_times(w, spec, seed=0)
    assert np.array_equal(again["time"], d["time"])  # the seed fixes the draw


@pytest.mark.usefixtures("fast_encoder")
def test_make_survival_cohort_from_real_tiles(tmp_path) -> None:
    spec = SurvivalCohortSpec(bag_size=10, train_bags=20, val_bags=10, test_bags_per_w=2, seed=1)
    features = FeatureConfig(encoder=FAST_ENCODER, precision="fp32", batch_size=64, workers=0)
    table = make_survival_cohort(example_tile_table(), tmp_path / "cohort", spec, features)
    rows = read_survival_cohort(table)
    summary = cohort_summary(rows)
    assert {k: v["bags"] for k, v in summary.items()} == {"train": 20, "val": 10, "test": 20}  # test: 2 per W = 1..10
    test_w = sorted(r["witnesses"] for r in rows if r["role"] == "test")
    assert set(test_w) - {0} == set(range(1, 11))
    with open(table, newline="") as fh:  # the cohort reader's split: test bags held out, train and val cross-validated
        assert {(r["role"], r["split"]) for r in csv.DictReader(fh)} == {("train", "train"), ("val", "train"), ("test", "test")}
    for r in rows:
        assert r["log_hazard"] == pytest.approx(math.log(0.1) + 3.0 * r["witnesses"] / 10)
    # the flat folder holds every bag once (hard links of the per-split files) and W matches the tiles
    flat = tmp_path / "cohort" / "slides"
    assert sorted(p.stem for p in flat.glob("*.h5")) == sorted(r["slide"] for r in rows)
    by_id = {r["slide"]: r for r in rows}
    train_dir = tmp_path / "cohort" / "features" / "train"
    truth = {}
    with open(train_dir / "tiles.csv", newline="") as fh:
        for t in csv.DictReader(fh):
            truth[t["case"]] = truth.get(t["case"], 0) + int(t["tile_label"])
    for bag in load_feature_dataset(train_dir, require_labels=True):
        assert by_id[f"train_{bag.bag_id}"]["witnesses"] == truth[bag.bag_id]
        assert (flat / f"train_{bag.bag_id}.h5").stat().st_ino == (train_dir / f"{bag.bag_id}.h5").stat().st_ino
    # run again: the composed bags and features are reused, the table is the same
    assert make_survival_cohort(example_tile_table(), tmp_path / "cohort", spec, features).read_text() == table.read_text()
    with pytest.raises(HistomilError, match="another spec"):
        make_survival_cohort(example_tile_table(), tmp_path / "cohort", spec.model_copy(update={"train_bags": 30}), features)

"""Cohort splits: stratified patient folds, group and fold columns, inner validation; the config from options and YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histomil.data.cohort import read_cohort
from histomil.errors import HistomilError
from histomil.evaluation.cohort_cv import cohort_config, cohort_folds
from histomil.evaluation.cohort_source import CohortSource
from histomil.evaluation.splitting import check_no_leak, grouped_stratified_folds, roles_of, stratified_groups_split


def source_of(tmp_path: Path, rows: list[str], header: str = "slide,patient,label") -> CohortSource:
    table = tmp_path / "t.csv"
    table.write_text(header + "\n" + "\n".join(rows) + "\n")
    return CohortSource(read_cohort(table, "label"), "patient", {})


def test_folds_are_stratified_patient_disjoint_and_cover_everyone(tmp_path):
    rows = [f"s{i}a,p{i},{int(i < 10)}" for i in range(30)] + [f"s{i}b,p{i},{int(i < 10)}" for i in range(0, 30, 3)]
    source = source_of(tmp_path, rows)
    patients = source.cohort.patients
    for seed in (0, 1):
        folds = cohort_folds(source, patients, 5, seed, 0.25)
        tested = []
        for a in folds:
            roles = roles_of(a)
            check_no_leak(roles)
            assert set(a) == set(patients)
            tested += sorted(roles["test"])
            # 10 positive of 30: each test fold 2 positives, 4 negatives; validation patients of both classes
            assert sorted(source.labels(sorted(roles["test"])).tolist()) == [0, 0, 0, 0, 1, 1]
            assert set(source.labels(sorted(roles["val"])).tolist()) == {0, 1}
            assert 4 <= len(roles["val"]) <= 8
        assert sorted(tested) == sorted(patients)
    assert cohort_folds(source, patients, 5, 0, 0.25) == cohort_folds(source, patients, 5, 0, 0.25)
    assert cohort_folds(source, patients, 5, 0, 0.25) != cohort_folds(source, patients, 5, 1, 0.25)


def test_group_column_keeps_a_group_in_one_fold_and_fold_column_gives_the_folds(tmp_path):
    rows = [f"s{i},p{i},{i % 2},site{i // 4},{i % 3}" for i in range(24)]
    source = source_of(tmp_path, rows, "slide,patient,label,group,fold")
    patients = source.cohort.patients
    site = {f"p{i}": f"site{i // 4}" for i in range(24)}
    # fold column present: its folds are the outer folds
    folds = cohort_folds(source, patients, 3, 0, 0.2)
    for f, a in enumerate(folds):
        assert {p for p, r in a.items() if r == "test"} == {f"p{i}" for i in range(24) if i % 3 == f}
        val_sites = {site[p] for p, r in a.items() if r == "val"}
        train_sites = {site[p] for p, r in a.items() if r == "train"}
        assert not val_sites & train_sites  # the inner split keeps groups whole too
    with pytest.raises(HistomilError, match=r"the fold column holds 3 folds \(\[0, 1, 2\]\), --folds asks for 5"):
        cohort_folds(source, patients, 5, 0, 0.2)
    # without a fold column: whole groups per fold
    rows = [f"s{i},p{i},{i % 2},site{i // 4}" for i in range(24)]
    source = source_of(tmp_path, rows, "slide,patient,label,group")
    for a in cohort_folds(source, source.cohort.patients, 3, 0, 0.2):
        roles = roles_of(a)
        for r1, r2 in (("train", "test"), ("val", "test"), ("train", "val")):
            assert not {site[p] for p in roles[r1]} & {site[p] for p in roles[r2]}


def test_impossible_splits_are_one_line_errors():
    with pytest.raises(HistomilError, match="3 patients cannot make 5 patient-disjoint folds"):
        grouped_stratified_folds([0, 1, 0], ["a", "b", "c"], 5, 0)
    with pytest.raises(HistomilError, match="every labelled row has the same label"):
        grouped_stratified_folds([1, 1, 1, 1], ["a", "b", "c", "d"], 2, 0)
    with pytest.raises(HistomilError, match="cannot be split into training and validation"):
        stratified_groups_split(["a", "b"], [0, 1], 0.5, 0, groups=["g", "g"])
    val = stratified_groups_split([f"p{i}" for i in range(10)], np.array([0] * 5 + [1] * 5), 0.2, 0)
    assert len(val) == 2 and {int(p[1:]) >= 5 for p in val} == {True, False}


def test_config_from_options_yaml_and_overrides(tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("lr: 0.001\nepochs: 7\nmodel_kwargs: {embed_dim: 16}\n")
    cfg = cohort_config({"table": "t.csv", "features": "f", "target": "label", "folds": None, "train": {"epochs": 9}},
                        yaml_file, {"train.patience": 3, "val_fraction": 0.3})
    assert cfg.folds == 5 and cfg.train.lr == 0.001 and cfg.train.epochs == 9 and cfg.train.patience == 3
    assert cfg.val_fraction == 0.3 and cfg.seeds == [0] and cfg.bag_level == "patient"
    whole = tmp_path / "cohort.yaml"
    whole.write_text("bag_level: slide\nseeds: [0, 1, 2]\ntrain: {lr: 0.002}\n")
    cfg = cohort_config({"table": "t.csv", "features": "f", "target": "label"}, whole)
    assert cfg.bag_level == "slide" and cfg.seeds == [0, 1, 2] and cfg.train.lr == 0.002
    with pytest.raises(HistomilError, match="nonsense"):
        cohort_config({"table": "t.csv", "features": "f", "target": "label"}, None, {"train.nonsense": 1})
    with pytest.raises(HistomilError, match="train.seed is not used here"):
        cohort_config({"table": "t.csv", "features": "f", "target": "label"}, None, {"train.seed": 1})

"""Regression ensembles: fold or seed models of one continuous target combined into one checkpoint whose
prediction is the mean of the members' predictions in target units (each member through its own training
mean and sd), refused for survival or mixed tasks, and written as is by ``histomil predict``."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from toy_bags import toy_problem
from typer.testing import CliRunner

from histomil.cli import app
from histomil.features.store import write_feature_bag
from histomil.training.checkpoint import (
    atomic_torch_save,
    combine_checkpoints,
    load_checkpoint,
    read_checkpoint_dict,
)
from histomil.training.tasks import task_from_checkpoint
from histomil.training.trainer import TrainConfig, predict, train

pytestmark = pytest.mark.usefixtures("one_thread")
ENCODER = {"name": "toy", "input_size": 1, "mean": [0] * 3, "std": [1] * 3}


def with_values(bags, scale: float, offset: float):
    """The bags with target ``offset + scale * (label + tiles / 10)``: a member's own units."""
    return [dataclasses.replace(b, target=(offset + scale * (b.label + len(b) / 10),)) for b in bags]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    train_bags, val_bags, _ = toy_problem()
    root = tmp_path_factory.mktemp("value_members")
    paths = []
    for seed, (scale, offset) in enumerate(((1.0, 0.0), (100.0, 50.0), (0.01, -3.0))):
        cfg = TrainConfig(model="gated_abmil", model_kwargs={"embed_dim": 16, "attn_dim": 8}, epochs=2, lr=2e-3,
                          min_epochs=0, seed=seed, task="regression")
        paths.append(train(with_values(train_bags, scale, offset), with_values(val_bags, scale, offset), cfg,
                           root / f"s{seed}", encoder_info=ENCODER).model_path)
    return paths, val_bags


def test_value_ensemble_is_the_mean_of_the_members_predictions_in_target_units(members, tmp_path) -> None:
    paths, bags = members
    ens, meta = load_checkpoint(combine_checkpoints(paths, tmp_path / "ens.pt"))
    task = task_from_checkpoint(meta)
    assert meta["model_name"] == "ensemble_mean_value" and meta["members"] == [str(p) for p in paths]
    assert task.name == "regression" and task.fitted == {"mean": 0.0, "sd": 1.0}
    member_tasks = [task_from_checkpoint(load_checkpoint(p)[1]) for p in paths]
    assert len({round(t.fitted["sd"], 3) for t in member_tasks}) == 3  # three different standardisations
    assert meta["model_kwargs"]["means"] == [t.fitted["mean"] for t in member_tasks]
    got = predict(ens, bags, task=task)
    each = [predict(m, bags, task=t) for m, t in zip((load_checkpoint(p)[0] for p in paths), member_tasks)]
    for i, (value, att) in enumerate(got):
        assert value.shape == (1,)
        np.testing.assert_allclose(value, np.mean([e[i][0] for e in each], axis=0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(att, np.mean([e[i][1] for e in each], axis=0), atol=1e-6)
        assert att.sum() == pytest.approx(1.0, abs=1e-5)


def _with_task(path, dest, state: dict) -> str:
    ckpt = read_checkpoint_dict(path)
    ckpt["extra"]["task"] = state
    atomic_torch_save(ckpt, dest)
    return str(dest)


def test_survival_or_mixed_tasks_are_refused_in_one_line(members, tmp_path) -> None:
    paths, _ = members
    survival = _with_task(paths[1], tmp_path / "survival.pt", {"name": "survival", "fitted": {}})
    classifier = _with_task(paths[1], tmp_path / "classifier.pt", {"name": "classification", "fitted": {"n_classes": 2}})
    runner = CliRunner()
    for other, msg in ((survival, "a survival model; only classifiers or regression models"),
                       (classifier, f"a classification model, {paths[0]} a regression model")):
        r = runner.invoke(app, ["ensemble", str(paths[0]), other, "--out", str(tmp_path / "e.pt")])
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and f"{other}: {msg}" in r.output.replace("\n", ""), r.output
    assert not (tmp_path / "e.pt").exists()


def test_predict_writes_the_ensemble_mean(members, tmp_path) -> None:
    paths, bags = members
    ens_path = combine_checkpoints(paths, tmp_path / "ens.pt")
    feats = tmp_path / "features"
    feats.mkdir()
    for b in bags[:6]:
        write_feature_bag(feats / f"{b.bag_id}.h5", dataclasses.replace(b, label=None, attrs={"encoder": "toy"}))
    r = CliRunner().invoke(app, ["predict", str(ens_path), str(feats), "--out", str(tmp_path / "p.csv"),
                                 "--precision", "fp32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = {row["bag_id"]: float(row["prediction"]) for row in csv.DictReader(fh)}
    members_pred = [predict(m, bags[:6], task=task_from_checkpoint(meta)) for m, meta in map(load_checkpoint, paths)]
    for i, b in enumerate(bags[:6]):
        assert rows[b.bag_id] == pytest.approx(np.mean([float(p[i][0][0]) for p in members_pred]), abs=2e-6)

"""The task interface: targets checked per task, regression metrics on a hand-computed example, and
regression / three-class models trained through the one trainer beating stated bars."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag, read_feature_bag, write_feature_bag
from histomil.training.checkpoint import load_checkpoint
from histomil.training.tasks import (
    ClassificationTask,
    RegressionTask,
    build_task,
    regression_scores,
    task_from_checkpoint,
)
from histomil.training.trainer import TrainConfig, predict, train

D = 8


def _fraction_bags(n: int, seed: int, n_tiles: int = 20) -> list[FeatureBag]:
    """Bags whose target is the fraction of 'tumour' tiles (shifted by +3 on feature 0)."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        w = int(rng.integers(0, n_tiles + 1))
        x = rng.normal(size=(n_tiles, D)).astype(np.float32)
        x[:w, 0] += 3.0
        bags.append(FeatureBag(f"b{seed}_{i}", x, [str(t) for t in range(n_tiles)], target=(w / n_tiles,)))
    return bags


def test_regression_scores_hand_computed() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.5, 2.0, 2.5, 5.0])
    s = regression_scores(y, pred)
    # errors 0.5, 0, -0.5, 1 -> MAE 0.5, MSE 1.5/4, SS_tot 5 -> R² = 1 - 1.5/5
    assert s["mae"] == pytest.approx(0.5)
    assert s["rmse"] == pytest.approx(math.sqrt(0.375))
    assert s["r2"] == pytest.approx(0.7)
    assert s["spearman"] == pytest.approx(1.0)  # same order
    # Pearson by hand: centred y (-1.5, -.5, .5, 1.5), centred pred (mean 2.75: -1.25, -.75, -.25, 2.25)
    cov = 1.875 + 0.375 - 0.125 + 3.375
    assert s["pearson"] == pytest.approx(cov / math.sqrt(5.0 * (1.5625 + 0.5625 + 0.0625 + 5.0625)))
    constant = regression_scores(y, np.full(4, 2.5))
    assert math.isnan(constant["pearson"]) and constant["r2"] == pytest.approx(-0.0)


def test_targets_of_the_wrong_kind_are_one_line_errors() -> None:
    x = np.zeros((2, D), np.float32)
    classed = FeatureBag("c", x, ["a", "b"], label=1)
    valued = FeatureBag("v", x, ["a", "b"], target=(0.3,))
    pair = FeatureBag("p", x, ["a", "b"], target=(5.0, 1.0))
    with pytest.raises(HistomilError, match=r"training bag 'c' has no regression target \(it has a class label only"):
        RegressionTask().targets([classed], "training")
    with pytest.raises(HistomilError, match=r"'p' has target \(5.0, 1.0\), not one value"):
        RegressionTask().targets([pair], "training")
    with pytest.raises(HistomilError, match=r"'v' has no label \(it has a continuous target"):
        ClassificationTask().targets([valued], "validation")
    with pytest.raises(HistomilError, match="non-finite"):
        RegressionTask().targets([FeatureBag("n", x, ["a", "b"], target=(float("nan"),))], "training")
    with pytest.raises(HistomilError, match="all have target 0.3"):
        RegressionTask().fit(np.array([0.3, 0.3], np.float32))


def test_config_refuses_unknown_losses_options_and_monitors() -> None:
    assert build_task(TrainConfig(task="regression", loss="huber")).loss_name == "huber"
    for data, msg in [
        ({"task": "regression", "loss": "cross_entropy"}, "unknown loss 'cross_entropy'"),
        ({"task": "regression", "monitor": "val_auc"}, "cannot monitor 'val_auc'"),
        ({"task": "classification", "task_options": {"huber_delta": 1}}, "unknown task option"),
        ({"task": "regression", "class_weights": True}, "classification only"),
        ({"task": "ranking"}, "task"),
    ]:
        with pytest.raises(HistomilError, match=msg):
            TrainConfig.parse(data)


def test_target_round_trips_through_feature_files(tmp_path) -> None:
    bag = FeatureBag("t", np.ones((2, D), np.float32), ["a", "b"], target=(12.5, 0.0))
    write_feature_bag(tmp_path / "t.h5", bag)
    back = read_feature_bag(tmp_path / "t.h5")
    assert back.target == (12.5, 0.0) and back.label is None and "target" not in back.attrs
    write_feature_bag(tmp_path / "c.h5", FeatureBag("c", np.ones((2, D), np.float32), ["a", "b"], label=2))
    assert read_feature_bag(tmp_path / "c.h5").target is None


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_regression_learns_the_tumour_fraction(tmp_path, loss: str) -> None:
    train_bags, val_bags, test_bags = _fraction_bags(120, 0), _fraction_bags(30, 1), _fraction_bags(60, 2)
    cfg = TrainConfig(task="regression", loss=loss, model="abmil", epochs=25, min_epochs=25, lr=2e-3, seed=0,
                      monitor="val_spearman")
    result = train(train_bags, val_bags, cfg, tmp_path / loss)
    with open(result.history_path) as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["epoch", "train_loss", "train_mae"] and "val_spearman" in header and "val_acc" not in header
    model, meta = load_checkpoint(result.model_path)
    task = task_from_checkpoint(meta)
    assert isinstance(task, RegressionTask) and task.output_size() == 1 and task.loss_name == loss
    preds = np.array([p[0] for p, _ in predict(model, test_bags, task=task)])
    y = np.array([b.target[0] for b in test_bags])
    scores = regression_scores(y, preds)
    assert scores["spearman"] > 0.9, scores
    assert scores["mae"] < 0.1, scores  # in the target's own units (a fraction), not standardised


def test_three_classes_train_and_predict_probabilities(tmp_path) -> None:
    rng = np.random.default_rng(0)

    def bags(n: int, tag: str) -> list[FeatureBag]:
        out = []
        for i in range(n):
            c = i % 3
            x = rng.normal(size=(10, D)).astype(np.float32)
            x[:3, c] += 3.0  # three tiles carry the class
            out.append(FeatureBag(f"{tag}{i}", x, [str(t) for t in range(10)], label=c))
        return out

    result = train(bags(60, "t"), bags(30, "v"), TrainConfig(epochs=15, min_epochs=15, lr=2e-3), tmp_path)
    model, meta = load_checkpoint(result.model_path)
    task = task_from_checkpoint(meta)
    assert task.prediction_columns() == ["prob_0", "prob_1", "prob_2"]
    test = bags(30, "x")
    probs = np.array([p for p, _ in predict(model, test, task=task)])
    assert probs.shape == (30, 3) and np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == [b.label for b in test]).mean() >= 0.9
    assert result.best_metrics["val_auc"] > 0.95


def test_checkpoints_from_before_tasks_are_classifiers() -> None:
    task = task_from_checkpoint({"n_classes": 4})
    assert isinstance(task, ClassificationTask) and task.output_size() == 4
    np.testing.assert_allclose(task.predict(torch.zeros(1, 4)), [[0.25] * 4])


def test_multiclass_metrics_hand_computed() -> None:
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

    from histomil.evaluation.task_metrics import multiclass_metrics

    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.6, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]])
    m = multiclass_metrics(y, probs, ["a", "b", "c"], n_resamples=200)
    # argmax: 0, 1, 1, 1, 2, 0 -> 4 of 6 right; recalls a 1/2, b 2/2, c 1/2
    assert m["accuracy"]["value"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"]["value"] == pytest.approx(2 / 3) == balanced_accuracy_score(y, probs.argmax(1))
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["confusion_matrix_normalised"][0] == [0.5, 0.5, 0.0]
    # class a one-vs-rest: positives score .7, .4; negatives .2 .1 .3 .5 -> pairs won 4 + 3 of 8
    assert m["per_class"]["a"]["roc_auc"]["value"] == pytest.approx(7 / 8)
    assert m["macro_roc_auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    ap = np.mean([average_precision_score(y == c, probs[:, c]) for c in range(3)])
    assert m["macro_pr_auc"]["value"] == pytest.approx(ap)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["c"]["recall"] == 0.5
    # F1: a 2*1/(2+1+1) = 1/2, b 2*2/(4+1+0) = 4/5, c 2*1/(2+0+1) = 2/3
    assert m["f1_macro"]["value"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["f1_macro"]["value"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    lo, hi = m["accuracy"]["low"], m["accuracy"]["high"]
    assert 0 <= lo < 4 / 6 < hi <= 1
    with pytest.raises(HistomilError, match="sum to 1"):
        multiclass_metrics(y, probs * 2)


def test_evaluate_writes_per_class_and_regression_files(tmp_path) -> None:
    from histomil.evaluation.evaluate import evaluate_sets

    train_bags, val_bags, test_bags = _fraction_bags(80, 0), _fraction_bags(20, 1), _fraction_bags(30, 2)
    cfg = TrainConfig(task="regression", model="mean_pool", epochs=5, min_epochs=5, lr=2e-3)
    result = train(train_bags, val_bags, cfg, tmp_path / "run")
    test_dir = tmp_path / "test"
    for b in test_bags:
        write_feature_bag(test_dir / f"{b.bag_id}.h5", b)
    results = evaluate_sets(result.model_path, {"test": test_dir}, tmp_path / "eval")
    assert results["test"]["n"] == 30 and results["test"]["spearman"]["low"] <= results["test"]["spearman"]["value"]
    assert "survival_train" not in torch.load(result.model_path, weights_only=True)["extra"]  # survival models only
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions_test.csv")))
    assert list(rows[0]) == ["bag_id", "target", "prediction"] and len(rows) == 30
    assert (tmp_path / "eval" / "scatter.png").stat().st_size > 1000


def test_cli_trains_evaluates_and_predicts_a_regression(tmp_path) -> None:
    from typer.testing import CliRunner

    from histomil.cli import app

    folders = {}
    for split, (n, seed) in {"train": (60, 0), "val": (20, 1), "test": (20, 2)}.items():
        folders[split] = tmp_path / split
        lines = ["case,target"]
        for b in _fraction_bags(n, seed):
            value = b.target[0]
            b.target = None  # the target comes from targets.csv
            write_feature_bag(folders[split] / f"{b.bag_id}.h5", b)
            lines.append(f"{b.bag_id},{value}")
        (folders[split] / "targets.csv").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    run = runner.invoke(app, ["train", str(folders["train"]), "--val", str(folders["val"]), "--out", str(tmp_path / "run"),
                              "--task", "regression", "--loss", "huber", "--model", "mean_pool", "--epochs", "3",
                              "--min-epochs", "3", "--monitor", "val_r2"])
    assert run.exit_code == 0, run.output
    ev = runner.invoke(app, ["evaluate", str(tmp_path / "run" / "model.pt"), str(folders["test"]), "--out",
                             str(tmp_path / "eval"), "--task", "regression"])
    assert ev.exit_code == 0, ev.output
    assert "spearman" in ev.output and (tmp_path / "eval" / "scatter.png").is_file()
    wrong = runner.invoke(app, ["evaluate", str(tmp_path / "run" / "model.pt"), str(folders["test"]), "--out",
                                str(tmp_path / "eval2"), "--task", "survival"])
    assert wrong.exit_code != 0 and "trained for regression, not survival" in wrong.output
    pr = runner.invoke(app, ["predict", str(tmp_path / "run" / "model.pt"), str(folders["test"]), "--out", str(tmp_path / "p.csv")])
    assert pr.exit_code == 0, pr.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 20 and "prediction" in rows[0] and "prob_positive" not in rows[0]
    bad = runner.invoke(app, ["train", str(folders["train"]), "--val", str(folders["val"]), "--out", str(tmp_path / "run2"),
                              "--task", "classification"])
    assert bad.exit_code != 0 and "no label" in bad.output


def test_report_of_a_three_class_evaluation(tmp_path) -> None:
    from typer.testing import CliRunner

    from histomil.cli import app

    rng = np.random.default_rng(3)

    def bags(n: int, tag: str) -> list[FeatureBag]:
        out = []
        for i in range(n):
            x = rng.normal(size=(6, D)).astype(np.float32)
            x[:2, i % 3] += 3.0
            out.append(FeatureBag(f"{tag}{i}", x, [str(t) for t in range(6)], label=i % 3))
        return out

    cfg = TrainConfig(epochs=8, min_epochs=8, lr=2e-3, task_options={"class_names": ["normal", "polyp", "tumour"]})
    result = train(bags(45, "t"), bags(15, "v"), cfg, tmp_path / "run")
    for b in bags(30, "x"):
        write_feature_bag(tmp_path / "test" / f"{b.bag_id}.h5", b)
    runner = CliRunner()
    ev = runner.invoke(app, ["evaluate", str(result.model_path), str(tmp_path / "test"), "--out", str(tmp_path / "eval")])
    assert ev.exit_code == 0, ev.output
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions_test.csv")))
    assert list(rows[0]) == ["bag_id", "y_true", "prob_0", "prob_1", "prob_2", "y_pred"]
    assert np.mean([r["y_true"] == r["y_pred"] for r in rows]) >= 0.8
    assert {p.name for p in (tmp_path / "eval").glob("*.png")} >= {"confusion_test.png", "roc_pr_test.png", "calibration_test.png"}
    rep = runner.invoke(app, ["report", str(tmp_path / "eval"), "--task", "classification"])
    assert rep.exit_code == 0, rep.output
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "per class" in page and "tumour" in page and page.count("data:image/png;base64") == 3
    wrong = runner.invoke(app, ["report", str(tmp_path / "eval"), "--task", "regression"])
    assert wrong.exit_code != 0 and "classification model, not regression" in wrong.output


def test_regression_models_combine_into_a_value_ensemble(tmp_path) -> None:
    from histomil.training.checkpoint import combine_checkpoints, read_checkpoint_dict

    cfg = TrainConfig(task="regression", model="mean_pool", epochs=1, min_epochs=1)
    a = train(_fraction_bags(20, 0), _fraction_bags(10, 1), cfg, tmp_path / "a").model_path
    b = train(_fraction_bags(20, 0), _fraction_bags(10, 1), cfg.model_copy(update={"seed": 1}), tmp_path / "b").model_path
    ens = read_checkpoint_dict(combine_checkpoints([a, b], tmp_path / "e.pt"))  # tests/test_regression_ensemble.py: its values
    assert ens["model_name"] == "ensemble_mean_value" and ens["extra"]["task"]["fitted"] == {"mean": 0.0, "sd": 1.0}


def test_targets_csv_problems_are_one_line_errors(tmp_path) -> None:
    from histomil.data.targets import load_task_bags

    folder = tmp_path / "f"
    for i in range(3):
        write_feature_bag(folder / f"b{i}.h5", FeatureBag(f"b{i}", np.ones((2, D), np.float32), ["a", "b"],
                                                          target=(0.5,) if i == 0 else None))
    cases = [
        ("case,value\nb0,1\n", "has no column target"),
        ("case,target\nb0,0.5\nb1,abc\n", "line 3: target 'abc' is not a number"),
        ("case,target\nb0,0.5\nb1,nan\n", "line 3: target is nan, not a finite number"),
        ("case,target\nb0,0.7\nb1,1\nb2,2\n", r"b0: its feature file stores target \(0.5,\), .* says \(0.7,\)"),
        ("case,target\nb0,0.5\nb1,1\n", "1 feature file\\(s\\) have no target: b2"),
        ("case,target\nb0,0.5\nb1,1\nb2,2\nb9,3\n", "1 case\\(s\\) have no feature file: b9"),
    ]
    for text, msg in cases:
        (folder / "targets.csv").write_text(text)
        with pytest.raises(HistomilError, match=msg):
            load_task_bags(folder, "regression")
    (folder / "targets.csv").write_text("case,target\nb0,0.5\nb1,1\nb2,2\n")
    assert [b.target for b in load_task_bags(folder, "regression")] == [(0.5,), (1.0,), (2.0,)]
    shared = tmp_path / "shared.csv"  # one table for several folders may list other cases
    shared.write_text("case,time,event\nb0,3,1\nb1,4,0\nb2,5,1\nother,1,1\n")
    (folder / "b0.h5").unlink()
    assert [b.target for b in load_task_bags(folder, "survival", shared)] == [(4.0, 0.0), (5.0, 1.0)]

"""The survival task through the one trainer: targets checked, Cox and discrete-time models learn a
hazard carried by the number of 'tumour' tiles, checkpoints predict risks, batches of one refused;
evaluating a checkpoint takes the risk-group cut and censoring distribution from its training bags."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from histomil.errors import HistomilError
from histomil.evaluation.survival import breslow_survival, cindex_harrell, survival_metrics, survival_targets
from histomil.evaluation.survival_report import held_out_times
from histomil.features.store import FeatureBag, write_feature_bag
from histomil.training.checkpoint import load_checkpoint
from histomil.training.survival_task import SurvivalTask
from histomil.training.tasks import build_task, task_from_checkpoint
from histomil.training.trainer import TrainConfig, predict, train

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8
N_TILES = 20


def _cohort(n: int, seed: int, beta: float = 3.0) -> tuple[list[FeatureBag], np.ndarray]:
    """Bags whose hazard is exp(beta * W / N_TILES), W tiles shifted by +3 on feature 0; ~30% censored.
    Returns the bags and their true log hazards (the oracle risk)."""
    rng = np.random.default_rng(seed)
    bags, true = [], []
    for i in range(n):
        w = int(rng.integers(0, N_TILES + 1))
        x = rng.normal(size=(N_TILES, D)).astype(np.float32)
        x[:w, 0] += 3.0
        log_h = beta * w / N_TILES
        t_event = rng.exponential(1.0 / np.exp(log_h))
        t_cens = rng.exponential(1.0 / 1.0)
        bags.append(FeatureBag(f"s{seed}_{i}", x, [str(t) for t in range(N_TILES)],
                               target=(float(min(t_event, t_cens)), float(t_event <= t_cens))))
        true.append(log_h)
    return bags, np.asarray(true)


def _cindex(bags: list[FeatureBag], risk: np.ndarray) -> float:
    y = np.array([b.target for b in bags])
    return cindex_harrell(survival_targets(y[:, 0], y[:, 1]), risk)


def test_survival_targets_are_checked() -> None:
    x = np.zeros((2, D), np.float32)
    task = SurvivalTask()
    assert task.targets([FeatureBag("a", x, ["1", "2"], target=(3.0, 1.0))], "training").tolist() == [[3.0, 1.0]]
    for bag, msg in [
        (FeatureBag("c", x, ["1", "2"], label=1), r"'c' has no survival target \(time, event\) \(it has a class label"),
        (FeatureBag("v", x, ["1", "2"], target=(0.4,)), r"'v' has target \(0.4,\), not \(time, event\)"),
        (FeatureBag("z", x, ["1", "2"], target=(0.0, 1.0)), "survival time 0.0; times must be above 0"),
        (FeatureBag("e", x, ["1", "2"], target=(2.0, 0.5)), "event 0.5"),
    ]:
        with pytest.raises(HistomilError, match=msg):
            task.targets([bag], "validation")
    with pytest.raises(HistomilError, match="no event"):
        task.fit(np.array([[1.0, 0.0], [2.0, 0.0]], np.float32))


def test_config_refuses_a_cox_batch_of_one_and_misplaced_options() -> None:
    with pytest.raises(HistomilError, match="batch_size 1 is too small"):
        TrainConfig.parse({"task": "survival"})
    assert build_task(TrainConfig(task="survival", batch_size=16, monitor="val_cindex")).output_size() == 1
    assert TrainConfig(task="survival", loss="discrete", task_options={"n_bins": 6}).batch_size == 1  # no risk set needed
    for data, msg in [
        ({"task": "survival", "batch_size": 8, "task_options": {"n_bins": 4}}, "n_bins applies to the discrete loss"),
        ({"task": "survival", "batch_size": 8, "task_options": {"ties": "exact"}}, "ties must be"),
        ({"task": "survival", "batch_size": 8, "monitor": "val_auc"}, "cannot monitor 'val_auc'"),
    ]:
        with pytest.raises(HistomilError, match=msg):
            TrainConfig.parse(data)


@pytest.mark.parametrize("loss", ["cox", "discrete"])
def test_survival_model_learns_the_hazard(tmp_path, loss: str) -> None:
    (train_bags, _), (val_bags, _), (test_bags, oracle) = _cohort(160, 0), _cohort(60, 1), _cohort(150, 2)
    options = {"n_bins": 4} if loss == "discrete" else {}
    cfg = TrainConfig(task="survival", loss=loss, task_options=options, model="abmil", epochs=20, min_epochs=20,
                      lr=2e-3, batch_size=16, seed=0, monitor="val_cindex")
    result = train(train_bags, val_bags, cfg, tmp_path / loss)
    with open(result.history_path) as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["epoch", "train_loss", "train_cindex"] and "val_cindex" in header
    model, meta = load_checkpoint(result.model_path)
    task = task_from_checkpoint(meta)
    assert isinstance(task, SurvivalTask) and task.loss_name == loss
    preds = np.array([p for p, _ in predict(model, test_bags, task=task)])
    assert preds.shape == (150, len(task.prediction_columns()))
    model_c, oracle_c = _cindex(test_bags, preds[:, 0]), _cindex(test_bags, oracle)
    assert oracle_c > 0.7  # the cohort has signal to find
    # the discrete head (4 free hazards) overfits these 160 bags sooner: its validation c-index peaks in the first
    # epochs (0.73) and settles near 0.67; the Cox head stays within 0.05 of the oracle
    assert model_c > oracle_c - (0.05 if loss == "cox" else 0.1), (model_c, oracle_c)
    if loss == "discrete":
        assert len(meta["task"]["fitted"]["edges"]) == 3
        surv = preds[:, 1:]
        assert np.all(np.diff(surv, axis=1) <= 1e-12) and np.all((surv >= 0) & (surv <= 1))


def test_survival_loss_on_validation_matches_cox_partial_likelihood() -> None:
    task = SurvivalTask()
    logits = torch.tensor([[0.0], [float(np.log(2.0))], [0.0]], dtype=torch.float64)
    y = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0]], np.float32)
    m = task.validation_metrics(logits, y)
    assert m["val_loss"] == pytest.approx(np.log(5) / 2)  # Efron, as in test_survival_losses
    # comparable pairs: bag 1 vs 3 (risk tie, 1/2) and bag 2 vs 3 (concordant); the tied events are not
    assert m["val_cindex"] == pytest.approx(0.75)


def test_discrete_survival_at_times_steps_at_the_bin_edges() -> None:
    task = SurvivalTask("discrete", {"n_bins": 3})
    task.restore({"edges": [1.0, 2.0]})
    pred = np.array([[0.0, 0.9, 0.5, 0.2]])  # risk, then S after bins 0, 1, 2
    # inside bin 0 nothing is survived yet (1), inside bin 1 bin 0 is (0.9), from 2 on bins 0-1 (0.5)
    assert task.survival_at(pred, np.array([0.5, 1.0, 1.5, 2.5])).tolist() == [[1.0, 0.9, 0.9, 0.5]]
    with pytest.raises(HistomilError, match="baseline hazard"):
        SurvivalTask().survival_at(pred[:, :1], np.array([1.0]))


def test_evaluate_splits_and_censors_at_the_stored_training_bags(tmp_path) -> None:
    from typer.testing import CliRunner

    from histomil.cli import app
    from histomil.evaluation.evaluate import evaluate_sets

    (train_bags, _), (val_bags, _), (candidates, _) = _cohort(60, 0), _cohort(20, 1), _cohort(80, 2)
    cfg = TrainConfig(task="survival", model="mean_pool", epochs=3, min_epochs=3, lr=2e-3, batch_size=16,
                      monitor="val_cindex")
    result = train(train_bags, val_bags, cfg, tmp_path / "run")
    stored = torch.load(result.model_path, weights_only=True)["extra"]["survival_train"]
    model, meta = load_checkpoint(result.model_path)
    task = task_from_checkpoint(meta)
    y_train = task.targets(train_bags, "training")
    assert stored["time"] == y_train[:, 0].tolist() and stored["event"] == y_train[:, 1].astype(int).tolist()
    train_risk = np.array([p[0] for p, _ in predict(model, train_bags, task=task)])
    assert stored["median_risk"] == pytest.approx(float(np.median(train_risk)), abs=1e-9)
    # each training bag's risk, in the bags' order, for the Breslow baseline of a Cox model
    assert np.allclose(stored["risk"], train_risk, rtol=0, atol=1e-6)
    assert stored["median_risk"] == float(np.median(stored["risk"]))
    # a test set of bags all above the training median: the training cut puts every one in the high-risk group
    risk = np.array([p[0] for p, _ in predict(model, candidates, task=task)])
    test_bags = [b for b, r in zip(candidates, risk) if r > stored["median_risk"]]
    y_test = np.array([b.target for b in test_bags])
    assert len(test_bags) >= 15 and y_test[:, 1].sum() >= 3
    for b in test_bags:
        write_feature_bag(tmp_path / "test" / f"{b.bag_id}.h5", b)
    results = evaluate_sets(result.model_path, {"test": tmp_path / "test"}, tmp_path / "eval", n_resamples=5)
    groups = results["test"]["risk_groups"]
    assert groups["cut"] == stored["median_risk"] and groups["cut_from"] == "training median risk"
    assert groups["groups"]["high risk"]["n"] == len(test_bags) and groups["groups"]["low risk"]["n"] == 0
    train_t, test_t = survival_targets(y_train[:, 0], y_train[:, 1]), survival_targets(y_test[:, 0], y_test[:, 1])
    test_risk = risk[risk > stored["median_risk"]]
    times = held_out_times(train_t, test_t)
    curves = breslow_survival(train_t, np.asarray(stored["risk"]), test_risk, times)  # as cross-validation does
    by_hand = survival_metrics(test_t, test_risk, train=train_t, times=times, survival=curves)
    assert results["test"]["cindex_uno"]["value"] == pytest.approx(by_hand["cindex_uno"], abs=1e-9)
    assert np.isfinite(by_hand["ibs"]) and results["test"]["ibs"]["value"] == pytest.approx(by_hand["ibs"], abs=1e-9)
    assert results["test"]["ibs"]["n_valid"] + results["test"]["ibs"]["n_skipped"] == 5  # with its bootstrap CI
    assert "| ibs |" in (tmp_path / "eval" / "metrics.md").read_text()
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["survival_reference"]["n_train_bags"] == 60 and doc["survival_reference"]["median_risk"] == stored["median_risk"]
    assert doc["survival_reference"]["training_risks"] is True
    rep = CliRunner().invoke(app, ["report", str(tmp_path / "eval"), "--task", "survival"])
    assert rep.exit_code == 0, rep.output
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "split at the training median risk" in page and page.count("data:image/png;base64") == 1

    # a Cox checkpoint with training targets and median but no per-bag risks (earlier histomil): no IBS, said in metrics.json
    old = torch.load(result.model_path, weights_only=True)
    del old["extra"]["survival_train"]["risk"]
    torch.save(old, tmp_path / "no_risk.pt")
    results = evaluate_sets(tmp_path / "no_risk.pt", {"test": tmp_path / "test"}, tmp_path / "eval_no_risk", n_resamples=5)
    assert "ibs" not in results["test"] and results["test"]["risk_groups"]["cut"] == stored["median_risk"]
    assert results["test"]["cindex_uno"]["value"] == pytest.approx(by_hand["cindex_uno"], abs=1e-9)
    assert "| ibs |" not in (tmp_path / "eval_no_risk" / "metrics.md").read_text()
    doc = json.loads((tmp_path / "eval_no_risk" / "metrics.json").read_text())
    assert "stores no training risks" in doc["survival_reference"]["note"] and doc["survival_reference"]["training_risks"] is False

    # a checkpoint without the training data (older histomil): today's behaviour, said in a warning and metrics.json
    del old["extra"]["survival_train"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="stores no training survival data"):
        results = evaluate_sets(tmp_path / "old.pt", {"test": tmp_path / "test"}, tmp_path / "eval_old", n_resamples=5)
    groups = results["test"]["risk_groups"]
    assert groups["cut"] == pytest.approx(float(np.median(test_risk))) and groups["cut_from"] == "set median risk"
    assert groups["groups"]["low risk"]["n"] > 0
    assert results["test"]["cindex_uno"]["value"] == pytest.approx(survival_metrics(test_t, test_risk)["cindex_uno"], abs=1e-9)
    doc = json.loads((tmp_path / "eval_old" / "metrics.json").read_text())
    assert doc["survival_reference"]["source"] == "test set" and "no training survival data" in doc["survival_reference"]["note"]

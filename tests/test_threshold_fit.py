"""The decision threshold is fitted on validation bags only, stored in model.pt, and applied unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from toy_bags import toy_problem

import histomil.training.trainer as trainer_module
from histomil.evaluation.evaluate import evaluate_sets
from histomil.evaluation.threshold import ThresholdConfig, choose_threshold, fit_threshold
from histomil.features.store import FeatureBag, write_feature_bag
from histomil.pipeline import StudyRunConfig
from histomil.training.checkpoint import load_checkpoint
from histomil.training.trainer import TrainConfig, predict, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train_bags, val_bags, _ = toy_problem()
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="gated_abmil", model_kwargs={"embed_dim": 32, "attn_dim": 16}, epochs=3, lr=2e-3,
                      min_epochs=0, seed=1)
    result = train(train_bags[:40], val_bags, cfg, out)
    return result.model_path, train_bags, val_bags


def test_threshold_sees_only_validation_bags(trained, monkeypatch, tmp_path) -> None:
    model_path, train_bags, val_bags = trained
    seen: list[str] = []
    real_predict = trainer_module.predict

    def spy(model, bags, *args, **kwargs):
        seen.extend(b.bag_id for b in bags)
        return real_predict(model, bags, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "predict", spy)
    threshold, p_val = fit_threshold(model_path, val_bags, ThresholdConfig(rule="youden"))
    assert seen == [b.bag_id for b in val_bags]  # nothing but the validation bags, each once
    y_val = np.array([b.label for b in val_bags])
    assert threshold == choose_threshold(y_val, p_val, "youden")
    _, meta = load_checkpoint(model_path)
    assert meta["threshold"] == threshold and meta["threshold_rule"] == "youden"

    # evaluation applies the stored threshold unchanged; test labels cannot move it
    monkeypatch.setattr(trainer_module, "predict", real_predict)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for b in train_bags[40:80]:
        write_feature_bag(test_dir / f"{b.bag_id}.h5", b)
    flipped_dir = tmp_path / "flipped"
    flipped_dir.mkdir()
    for b in train_bags[40:80]:
        write_feature_bag(flipped_dir / f"{b.bag_id}.h5", FeatureBag(bag_id=b.bag_id, features=b.features, tile_paths=b.tile_paths, label=1 - b.label, attrs=b.attrs))
    evaluate_sets(model_path, {"test": test_dir, "flipped": flipped_dir}, tmp_path / "ev")
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert doc["threshold"] == threshold
    _, meta_after = load_checkpoint(model_path)
    assert meta_after["threshold"] == threshold  # evaluating never refits it


def test_fixed_threshold_is_recorded_too(trained) -> None:
    model_path, _, val_bags = trained
    threshold, _ = fit_threshold(model_path, val_bags, ThresholdConfig(rule="fixed", value=0.3))
    assert threshold == 0.3 and load_checkpoint(model_path)[1]["threshold"] == 0.3


def test_run_config_takes_a_number_or_a_rule(tmp_path) -> None:
    assert StudyRunConfig(tiles=tmp_path).threshold_rule() == ThresholdConfig(rule="fixed", value=0.5)
    cfg = StudyRunConfig.model_validate({"tiles": str(tmp_path), "threshold": {"rule": "sensitivity", "value": 0.95}})
    assert cfg.threshold_rule().rule == "sensitivity" and cfg.threshold_rule().value == 0.95
    with pytest.raises(ValueError, match="youden rule takes no value"):
        StudyRunConfig.model_validate({"tiles": str(tmp_path), "threshold": {"rule": "youden", "value": 0.2}})


def test_label_smoothing_bounds_the_logits(tmp_path) -> None:
    """eps = 0.1 asks for |logit difference| = log(19) ~ 2.94 (typical training bag), not for ever larger
    logits (overconfidence)."""
    train_bags, val_bags, _ = toy_problem()
    common = dict(model="gated_abmil", model_kwargs={"embed_dim": 32, "attn_dim": 16}, epochs=8, lr=5e-3,
                  min_epochs=0, patience=50, seed=0)
    spread = {}
    for eps in (0.0, 0.1):
        result = train(train_bags, val_bags, TrainConfig(**common, label_smoothing=eps), tmp_path / str(eps))
        model, _ = load_checkpoint(result.model_path)
        p = np.array([pr[1] for pr, _ in predict(model, train_bags)])
        z = np.log(p) - np.log1p(-p)
        spread[eps] = float(np.median(np.abs(z)))
        assert result.best_metrics["val_auc"] > 0.9  # still learns the problem
    print(spread)
    assert spread[0.1] < 3.5 and spread[0.0] > spread[0.1] + 1.0

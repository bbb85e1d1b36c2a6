"""Threshold rules, bootstrap intervals, run summaries and calibration, on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import (
    METRICS,
    _metrics_from_counts,
    _Prepared,
    bootstrap_ci,
    bootstrap_mean_ci,
    summarize_runs,
)
from histomil.evaluation.calibration import (
    expected_calibration_error,
    plot_reliability,
    reliability_curve,
)
from histomil.evaluation.metrics import binary_metrics
from histomil.evaluation.threshold import choose_threshold

# ------------------------------------------------------------------------------ thresholds

Y = [0, 0, 0, 1, 0, 1, 1, 1]
P = [0.05, 0.10, 0.20, 0.30, 0.40, 0.60, 0.70, 0.90]


def test_fixed_threshold_ignores_the_data():
    assert choose_threshold(Y, P) == 0.5
    assert choose_threshold(Y, P, "fixed", 0.3) == 0.3
    with pytest.raises(HistomilError, match=r"\[0, 1\]"):
        choose_threshold(Y, P, "fixed", 1.5)


def test_youden_by_hand():
    # Cuts (p >= t): at 0.60 -> tpr 3/4, fpr 0 (J 0.75); at 0.30 -> tpr 1, fpr 1/4 (J 0.75);
    # ties go to the higher cut, placed halfway down to the next validation score (0.40).
    assert choose_threshold(Y, P, "youden") == pytest.approx((0.60 + 0.40) / 2)
    # perfectly separated: halfway between the lowest positive and the highest negative
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.8], "youden") == pytest.approx(0.5)
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.25, 0.8], "youden") == pytest.approx(0.225)
    # the chosen threshold reproduces the best J on the validation data
    t = choose_threshold(Y, P, "youden")
    m = binary_metrics(Y, P, t)
    assert m["recall"] + m["specificity"] - 1 == pytest.approx(0.75)


def test_sensitivity_target_by_hand():
    # sensitivity >= 0.75 first reached at cut 0.60 (3 of 4 positives), next lower score 0.40
    assert choose_threshold(Y, P, "sensitivity", 0.75) == pytest.approx(0.5)
    # >= 0.9 needs all 4 positives: cut 0.30, next lower 0.20
    t = choose_threshold(Y, P, "sensitivity")
    assert t == pytest.approx(0.25)
    assert binary_metrics(Y, P, t)["recall"] == 1.0
    # the lowest cut calls everything positive and has no lower neighbour
    assert choose_threshold([1, 0], [0.2, 0.6], "sensitivity", 1.0) == pytest.approx(0.2)


def test_data_rules_need_both_classes_and_valid_values():
    with pytest.raises(HistomilError, match="all 3 bags are positive"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], "youden")
    with pytest.raises(HistomilError, match="rule"):
        choose_threshold(Y, P, "best")
    with pytest.raises(HistomilError, match="sensitivity"):
        choose_threshold(Y, P, "sensitivity", 0.0)
    with pytest.raises(HistomilError, match="logits"):
        choose_threshold([0, 1], [-2.0, 3.0], "youden")


# ------------------------------------------------------------------------------ bootstrap


def _scores(n: int, seed: int, sep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logit = sep * (2 * y - 1) + rng.normal(0, 1.0, n)
    p = np.round(1 / (1 + np.exp(-logit)), 2)  # rounding makes ties, which the AUC sums must handle
    return y, p


def test_vectorised_metrics_match_sklearn_on_resamples():
    y, p = _scores(60, 1)
    thr = 0.5
    prep = _Prepared(y, p, p >= thr)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, y.size, y.size)
        w = np.bincount(idx, minlength=y.size)[None, :].astype(float)
        got = {k: float(v[0]) for k, v in _metrics_from_counts(w, prep, METRICS).items()}
        ref = binary_metrics(y[idx], p[idx], thr)
        for m in METRICS:
            assert got[m] == pytest.approx(ref[m], abs=1e-12), m
        assert got["roc_auc"] == pytest.approx(roc_auc_score(y[idx], p[idx]))
        assert got["pr_auc"] == pytest.approx(average_precision_score(y[idx], p[idx]))


def test_ci_contains_the_point_estimate_and_narrows_with_more_bags():
    y, p = _scores(80, 2)
    small = bootstrap_ci(y, p, 0.5, n_resamples=1000, seed=0)
    ref = binary_metrics(y, p, 0.5)
    for m in METRICS:
        assert small[m]["value"] == pytest.approx(ref[m])
        assert small[m]["low"] <= small[m]["value"] <= small[m]["high"], m
        assert small[m]["n_valid"] + small[m]["n_skipped"] == 1000
    y2, p2 = _scores(2000, 3)
    big = bootstrap_ci(y2, p2, 0.5, n_resamples=1000, seed=0)
    for m in METRICS:
        assert big[m]["high"] - big[m]["low"] < 0.6 * (small[m]["high"] - small[m]["low"]), m
    # about 1/sqrt(n): the AUC interval on 2,000 bags is a few hundredths wide
    assert 0.02 < big["roc_auc"]["high"] - big["roc_auc"]["low"] < 0.08
    # same seed, same interval
    again = bootstrap_ci(y, p, 0.5, n_resamples=1000, seed=0)
    assert again == small


def test_one_class_resamples_are_skipped_and_counted():
    y = np.array([1, 0, 0, 0, 0, 0])  # a resample misses the only positive with prob (5/6)^6 ~ 0.33
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.8])
    ci = bootstrap_ci(y, p, 0.5, n_resamples=2000, seed=1)
    skipped = ci["roc_auc"]["n_skipped"]
    assert 0.28 * 2000 < skipped < 0.39 * 2000
    assert ci["pr_auc"]["n_skipped"] == skipped
    assert ci["recall"]["n_skipped"] == skipped  # no positive bag -> recall undefined too
    assert ci["accuracy"]["n_skipped"] == 0
    # a single-class set: the AUC has no value and no interval
    one = bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3], 0.5, n_resamples=50)
    assert math.isnan(one["roc_auc"]["value"]) and math.isnan(one["roc_auc"]["low"])
    assert one["roc_auc"]["n_skipped"] == 50
    assert one["accuracy"]["value"] == 1.0


def test_per_bag_thresholds_for_pooled_runs():
    y = np.array([1, 1, 0, 0])
    p = np.array([0.4, 0.6, 0.3, 0.5])
    ci = bootstrap_ci(y, p, [0.35, 0.55, 0.35, 0.55], n_resamples=10)
    assert ci["accuracy"]["value"] == 1.0  # preds 1, 1, 0, 0 with their own thresholds
    assert bootstrap_ci(y, p, 0.5, n_resamples=10)["accuracy"]["value"] == 0.5  # one threshold: 0, 1, 0, 1
    with pytest.raises(HistomilError, match="one per bag"):
        bootstrap_ci(y, p, [0.5, 0.5], n_resamples=10)
    with pytest.raises(HistomilError, match="unknown metric"):
        bootstrap_ci(y, p, 0.5, metrics=("mcc",))


def test_summarize_runs():
    runs = [{"accuracy": 0.8, "roc_auc": 0.9}, {"accuracy": 0.6, "roc_auc": None}, {"accuracy": 0.7, "roc_auc": float("nan")}]
    s = summarize_runs(runs, ("accuracy", "roc_auc", "f1"))
    assert s["accuracy"]["mean"] == pytest.approx(0.7)
    assert s["accuracy"]["std"] == pytest.approx(0.1)  # sample std (ddof=1)
    assert s["accuracy"]["n"] == 3
    assert s["roc_auc"] == {"mean": 0.9, "std": s["roc_auc"]["std"], "n": 1} and math.isnan(s["roc_auc"]["std"])
    assert s["f1"]["n"] == 0 and math.isnan(s["f1"]["mean"])


# ------------------------------------------------------------------------------ calibration


def test_ece_perfectly_calibrated_is_zero():
    y, p = [], []
    for b in range(10):
        centre = (b + 0.5) / 10
        n_pos = round(100 * centre)
        y += [1] * n_pos + [0] * (100 - n_pos)
        p += [centre] * 100
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


def test_ece_confidently_wrong_is_one_and_hand_case():
    assert expected_calibration_error([1, 1, 0, 0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(1.0)
    # bin [0.2, 0.3): two bags at 0.25, one positive -> gap 0.25; bin [0.9, 1]: 0.95 and 1.0, both
    # positive -> gap 1 - 0.975; weights 2/4 each
    y, p = [1, 0, 1, 1], [0.25, 0.25, 0.95, 1.0]
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.25 + 0.5 * 0.025)
    curve = reliability_curve(y, p)
    assert curve["bin"] == [2, 9] and curve["count"] == [2, 2]
    assert curve["frac_pos"] == [0.5, 1.0]
    # with 2 bins everything above 0.5 shares a bin
    assert reliability_curve(y, p, n_bins=2)["count"] == [2, 2]
    with pytest.raises(HistomilError, match="n_bins"):
        expected_calibration_error(y, p, n_bins=0)


def test_reliability_plot_is_a_png(tmp_path):
    y, p = _scores(200, 4)
    out = plot_reliability({"test_40_20": (y, p), "test_40_1": (y, np.clip(p * 0.5, 0, 1))}, tmp_path / "rel.png")
    assert out.stat().st_size > 5000
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert not list(tmp_path.glob("*.tmp*"))


def test_mean_ci_over_runs():
    runs = [_scores(300, s) for s in (5, 6, 7)]
    triples = [(y, p, 0.5) for y, p in runs]
    ci = bootstrap_mean_ci(triples, n_resamples=500, seed=0)
    for m in METRICS:
        per_run = [binary_metrics(y, p, 0.5)[m] for y, p in runs]
        assert ci[m]["value"] == pytest.approx(np.mean(per_run))
        assert ci[m]["low"] < ci[m]["value"] < ci[m]["high"]
        assert ci[m]["n_runs"] == 3
        # averaging 3 runs of 300 bags: narrower than one run of 300 bags
        one = bootstrap_ci(*triples[0], n_resamples=500, seed=0)[m]
        assert ci[m]["high"] - ci[m]["low"] < one["high"] - one["low"]
    # models on different score scales: each run is ranked perfectly, the pooled AUC is not
    y = np.array([0, 0, 1, 1])
    scaled = [(y, np.array([0.1, 0.2, 0.3, 0.4]), 0.25), (y, np.array([0.6, 0.7, 0.8, 0.9]), 0.75)]
    assert bootstrap_mean_ci(scaled, n_resamples=50)["roc_auc"]["value"] == 1.0
    pooled = bootstrap_ci(np.r_[y, y], np.r_[scaled[0][1], scaled[1][1]], [0.25] * 4 + [0.75] * 4, n_resamples=50)
    assert pooled["roc_auc"]["value"] < 1.0
    # a run where the metric is undefined everywhere is left out
    one_class = (np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]), 0.5)
    mixed = bootstrap_mean_ci([triples[0], one_class], n_resamples=100)
    assert mixed["roc_auc"]["n_runs"] == 1 and mixed["accuracy"]["n_runs"] == 2

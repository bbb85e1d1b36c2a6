"""Survival metrics, Kaplan-Meier risk groups and the log-rank test against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chi2

from histomil.errors import HistomilError
from histomil.evaluation.survival import (
    breslow_survival,
    cindex_harrell,
    cindex_uno,
    evaluation_times,
    ibs,
    survival_bootstrap_ci,
    survival_metrics,
    survival_targets,
    td_auc,
)
from histomil.evaluation.survival_plots import plot_km_risk_groups, risk_cut, risk_groups


def test_harrell_cindex_hand_computed_with_ties_and_censoring() -> None:
    # A(2, event, .9) B(4, event, .5) C(4, censored, .7) D(6, event, .5) E(8, censored, .1).
    # Comparable pairs (earlier time is an event; an event and a censoring at the same time count):
    # A-B A-C A-D A-E: concordant (4); B-C: discordant (.5 < .7); B-D: risk tie (1/2); B-E: concordant;
    # D-E: concordant. C and E are censored: no pair starts from them. (4 + 1 + 1 + 0.5) / 8.
    targets = survival_targets([2, 4, 4, 6, 8], [1, 1, 0, 1, 0])
    assert cindex_harrell(targets, [0.9, 0.5, 0.7, 0.5, 0.1]) == pytest.approx(6.5 / 8)
    assert cindex_harrell(targets, [-0.9, -0.5, -0.7, -0.5, -0.1]) == pytest.approx(1 - 6.5 / 8)


def test_uno_cindex_hand_computed() -> None:
    # times 1 2 3 4, subject 2 censored. Censoring Kaplan-Meier G: 1 before t=2, 2/3 from t=2 on.
    # Pairs from event 1 (G=1, weight 1): vs 2, 3, 4, all concordant (.9 above all). Pair from event 3
    # (G(3)=2/3, weight 1/G^2 = 9/4): vs 4, discordant (.2 < .3). Uno: 3 / (3 + 9/4); Harrell: 3 / 4.
    targets = survival_targets([1, 2, 3, 4], [1, 0, 1, 1])
    risk = [0.9, 0.1, 0.2, 0.3]
    assert cindex_uno(targets, targets, risk, tau=None) == pytest.approx(3 / 5.25)
    assert cindex_harrell(targets, risk) == pytest.approx(0.75)
    # without censoring both are the plain fraction of concordant pairs
    full = survival_targets([1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
    r = [0.5, 0.4, 0.45, 0.1, 0.2]
    assert cindex_uno(full, full, r, tau=None) == pytest.approx(cindex_harrell(full, r))
    assert cindex_harrell(full, r) == pytest.approx(8 / 10)


def test_td_auc_and_ibs_hand_computed_without_censoring() -> None:
    targets = survival_targets([1, 2, 3, 4], [1, 1, 1, 1])
    # at t = 2 the cases (T <= 2) are bags 1, 2 and the controls bags 3, 4: of the 4 pairs 2 are ordered
    aucs, mean = td_auc(targets, targets, [0.4, 0.1, 0.3, 0.2], np.array([2.0]))
    assert aucs[0] == pytest.approx(0.5) and mean == pytest.approx(0.5)
    # Brier at 1.5: truth 0 1 1 1 vs S .2 .6 .8 .9 -> (.04 + .16 + .04 + .01) / 4 = .0625
    # Brier at 2.5: truth 0 0 1 1 vs S .1 .3 .7 .8 -> (.01 + .09 + .09 + .04) / 4 = .0575; mean of the two
    s = np.array([[0.2, 0.1], [0.6, 0.3], [0.8, 0.7], [0.9, 0.8]])
    assert ibs(targets, targets, s, np.array([1.5, 2.5])) == pytest.approx(0.06)


def test_survival_metrics_on_a_known_hazard_and_bootstrap() -> None:
    rng = np.random.default_rng(0)
    n = 400
    x = rng.uniform(0, 1, n)
    t_event = rng.exponential(1 / np.exp(3 * x))
    t_cens = rng.exponential(1 / 0.5, n)
    targets = survival_targets(np.minimum(t_event, t_cens), t_event <= t_cens)
    times = evaluation_times(targets)
    assert times.size == 8 and np.all(np.diff(times) > 0)
    true_risk = 3 * x
    surv = breslow_survival(targets, true_risk, true_risk, times)
    good = survival_metrics(targets, true_risk, times=times, survival=surv)
    null = survival_metrics(targets, np.zeros(n), times=times, survival=breslow_survival(targets, np.zeros(n), np.zeros(n), times))
    assert good["cindex_harrell"] > 0.68 and good["cindex_uno"] > 0.68 and good["td_auc"] > 0.7
    assert null["cindex_harrell"] == pytest.approx(0.5) and null["td_auc"] == pytest.approx(0.5)
    assert good["ibs"] < null["ibs"]  # the true hazard predicts survival better than the Kaplan-Meier baseline
    ci = survival_bootstrap_ci(targets, true_risk, times=times, survival=surv, n_resamples=60, seed=1)
    for m, v in ci.items():
        assert v["value"] == pytest.approx(good[m])
        assert v["low"] <= v["value"] <= v["high"] and v["n_valid"] + v["n_skipped"] == 60
    assert ci["cindex_harrell"]["high"] - ci["cindex_harrell"]["low"] < 0.1


def test_survival_inputs_are_checked() -> None:
    with pytest.raises(HistomilError, match="event must be 0 or 1"):
        survival_targets([1, 2], [1, 2])
    with pytest.raises(HistomilError, match="above 0"):
        survival_targets([0, 2], [1, 1])
    with pytest.raises(HistomilError, match="2 times but 3"):
        survival_targets([1, 2], [1, 1, 0])
    with pytest.raises(HistomilError, match="risk scores"):
        cindex_harrell(survival_targets([1, 2], [1, 1]), [0.1])
    # no comparable pair: undefined, not a number that looks like a result
    assert math.isnan(cindex_harrell(survival_targets([1, 2], [0, 0]), [0.1, 0.2]))


def test_logrank_and_kaplan_meier_hand_computed(tmp_path) -> None:
    # low risk: times 2, 4 (events); high risk: times 1, 3 (events). Expected high-risk events per event time:
    # t=1: 2/4, t=2: 1/3, t=3: 1/2, t=4: 0; variances 1/4, 2/9, 1/4, 0 -> chi2 = (2 - 4/3)^2 / (13/18)
    targets = survival_targets([1, 2, 3, 4], [1, 1, 1, 1])
    risk = [0.9, 0.1, 0.8, 0.2]
    cut = risk_cut([0.1, 0.5, 0.6, 0.9])  # the training median, 0.55
    assert cut == pytest.approx(0.55)
    res = risk_groups(targets, risk, cut)
    expected = (2 - 4 / 3) ** 2 / (13 / 18)
    assert res["logrank_chisq"] == pytest.approx(expected)
    assert res["logrank_p"] == pytest.approx(chi2.sf(expected, 1))
    high = res["groups"]["high risk"]
    assert high["n"] == 2 and high["events"] == 2
    assert high["survival"].tolist() == pytest.approx([0.5, 0.0]) and high["median_survival"] == 1.0
    summary = plot_km_risk_groups(targets, risk, cut, tmp_path / "km.png", title="test")
    assert (tmp_path / "km.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["logrank_p"] == pytest.approx(res["logrank_p"])
    assert summary["groups"]["low risk"] == {"n": 2, "events": 2, "median_survival": 2.0}
    # one group empty: the curve of the other, no test
    lone = plot_km_risk_groups(targets, risk, 10.0, tmp_path / "one.png")
    assert lone["groups"]["high risk"]["n"] == 0 and math.isnan(lone["logrank_p"])


def test_evaluate_survival_takes_everything_fitted_from_the_training_bags(tmp_path) -> None:
    from histomil.evaluation.survival_report import evaluate_survival, held_out_times

    rng = np.random.default_rng(4)

    def cohort(n: int) -> tuple[np.ndarray, object]:
        x = rng.uniform(0, 1, n)
        t_event, t_cens = rng.exponential(1 / np.exp(2 * x)), rng.exponential(2.0, n)
        return 2 * x, survival_targets(np.minimum(t_event, t_cens), t_event <= t_cens)

    train_risk, train = cohort(300)
    test_risk, test = cohort(200)
    shifted = train_risk + 0.5  # a training median above the test one: the groups must follow the training cut
    out = evaluate_survival(train, shifted, test, test_risk, km_png=tmp_path / "km.png", n_resamples=20)
    times = held_out_times(train, test)
    assert out["times"] == times.tolist() and times.max() < train.time.max()
    assert out["risk_groups"]["cut"] == pytest.approx(float(np.median(shifted)))
    assert out["risk_groups"]["groups"]["high risk"]["n"] == int((test_risk > np.median(shifted)).sum())
    expected = survival_metrics(test, test_risk, train, times, breslow_survival(train, shifted, test_risk, times))
    for m, v in expected.items():
        assert out["metrics"][m]["value"] == pytest.approx(v)
    assert out["metrics"]["cindex_harrell"]["value"] > 0.6 and out["risk_groups"]["logrank_p"] < 0.01
    assert (tmp_path / "km.png").stat().st_size > 1000


def test_censoring_past_the_evaluation_times_changes_no_brier_score_or_auc() -> None:
    from histomil.evaluation.survival import inside_training_follow_up

    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, 150)
    t_event, t_cens = rng.exponential(1 / np.exp(2 * x)), rng.exponential(2.0, 150)
    test = survival_targets(np.minimum(t_event, t_cens), t_event <= t_cens)
    train = survival_targets(np.r_[test.time, 100.0], np.r_[test.event, False])  # followed longer than the test bags
    times = evaluation_times(test)
    surv = breslow_survival(train, np.r_[2 * x, 0.0], 2 * x, times)
    # censor the test bags by hand between the last evaluation time and the last test time: nothing moves
    cut = 1.01 * times.max()
    late = test.time > cut
    censored = survival_targets(np.where(late, cut, test.time), test.event & ~late)
    assert late.sum() > 10
    assert ibs(train, censored, surv, times) == pytest.approx(ibs(train, test, surv, times), rel=1e-12)
    assert td_auc(train, censored, 2 * x, times)[1] == pytest.approx(td_auc(train, test, 2 * x, times)[1], rel=1e-12)
    # test bags followed past the last training time are censored there, so they can be scored at all
    short = survival_targets(np.minimum(train.time[:-1], np.quantile(test.time, 0.9)), train.event[:-1])
    moved = inside_training_follow_up(short, test, times)
    assert moved.time.max() < short.time.max() and math.isfinite(ibs(short, test, surv, times))

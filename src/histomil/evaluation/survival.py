"""Survival metrics with bootstrap confidence intervals, computed by scikit-survival.

A prediction is a *risk* per bag (higher = earlier event), plus optionally a survival probability
per bag at evaluation times (for the Brier score). Targets are ``time`` (> 0) and ``event`` (1 = the
event was observed at ``time``, 0 = censored then). The estimators are scikit-survival's (chosen
over lifelines, which has neither Uno's c-index, time-dependent AUC nor the integrated Brier score,
and torchsurv, which has no log-rank test; benchmarks/RESULTS and the README name the choice):

* Harrell's c-index (``cindex_harrell``): the fraction of comparable pairs ordered correctly by risk.
  A pair is comparable when the earlier time is an event; an event and a censoring at the same time
  are comparable (the event came first); pairs tied in risk count one half.
* Uno's c-index (``cindex_uno``): the same, weighted by the inverse probability of staying uncensored
  (the censoring distribution is the Kaplan-Meier estimate on the *training* targets), truncated at
  ``tau`` (default: the last evaluation time), so it does not depend on the censoring distribution.
* Time-dependent cumulative/dynamic AUC at the evaluation times and its mean (``td_auc``).
* Integrated Brier score over the evaluation times (``ibs``, lower is better), only when survival
  probabilities are given (:func:`breslow_survival` makes them from Cox risks).

Evaluation times default to the 10th..80th percentiles of the observed event times (see
:func:`evaluation_times`). Bootstrap intervals resample bags with replacement; a resample where a
metric is undefined (no comparable pair, times outside its follow-up) is skipped and counted.
scikit-survival is imported inside the functions that use it, so training and evaluating classifiers
and regressors does not load it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histomil.errors import HistomilError

METRICS: tuple[str, ...] = ("cindex_harrell", "cindex_uno", "td_auc", "ibs")
DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class SurvivalTargets:
    """Checked follow-up times (float64, > 0) and event indicators (bool) of n bags."""

    time: np.ndarray
    event: np.ndarray

    def structured(self) -> np.ndarray:
        """The targets as scikit-survival's structured array."""
        from sksurv.util import Surv
        return Surv.from_arrays(event=self.event, time=self.time)

    def __len__(self) -> int:
        return int(self.time.size)

    def subset(self, idx: np.ndarray) -> SurvivalTargets:
        return SurvivalTargets(self.time[idx], self.event[idx])


def survival_targets(time: Any, event: Any, what: str = "survival targets") -> SurvivalTargets:
    """Check times (finite, > 0) and events (0/1 or bool) of equal length; one error line otherwise."""
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e_raw = np.asarray(event)
    if e_raw.dtype == bool:
        e = e_raw.reshape(-1)
    else:
        e_num = np.asarray(e_raw, dtype=np.float64).reshape(-1)
        if not np.all(np.isin(e_num, (0.0, 1.0))):
            bad = e_num[~np.isin(e_num, (0.0, 1.0))][0]
            raise HistomilError(f"{what}: event must be 0 or 1, got {bad!r}")
        e = e_num == 1.0
    if t.size != e.size:
        raise HistomilError(f"{what}: {t.size} times but {e.size} event indicators")
    if t.size == 0:
        raise HistomilError(f"{what}: no bags")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise HistomilError(f"{what}: every time must be a finite number above 0 (got {t[~(np.isfinite(t) & (t > 0))][0]!r})")
    return SurvivalTargets(t, e)


def _risk(risk: Any, n: int, what: str) -> np.ndarray:
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if r.size != n:
        raise HistomilError(f"{what}: {r.size} risk scores for {n} bags")
    if not np.all(np.isfinite(r)):
        raise HistomilError(f"{what}: risk scores must be finite")
    return r


def evaluation_times(targets: SurvivalTargets, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> np.ndarray:
    """Distinct times at ``quantiles`` of the observed event times, strictly inside the follow-up range
    (scikit-survival's time-dependent metrics need ``min(time) <= t < max(time)``); empty without events."""
    events = targets.time[targets.event]
    if events.size == 0:
        return np.empty(0)
    t = np.unique(np.quantile(events, np.asarray(quantiles, dtype=np.float64)))
    return t[(t >= targets.time.min()) & (t < targets.time.max())]


def cindex_harrell(targets: SurvivalTargets, risk: Any) -> float:
    """Harrell's c-index; NaN when no pair is comparable (no event before another time)."""
    r = _risk(risk, len(targets), "c-index")
    try:
        from sksurv.metrics import concordance_index_censored
        return float(concordance_index_censored(targets.event, targets.time, r)[0])
    except (ValueError, ZeroDivisionError):
        return math.nan


def cindex_uno(train: SurvivalTargets, targets: SurvivalTargets, risk: Any, tau: float | None) -> float:
    """Uno's IPCW c-index truncated at ``tau``; NaN when undefined (no comparable pair before tau,
    or a censoring probability of 0 at a test time)."""
    r = _risk(risk, len(targets), "Uno's c-index")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sksurv.metrics import concordance_index_ipcw
            return float(concordance_index_ipcw(train.structured(), targets.structured(), r, tau=tau)[0])
    except (ValueError, ZeroDivisionError):
        return math.nan


def inside_training_follow_up(train: SurvivalTargets, targets: SurvivalTargets, times: np.ndarray) -> SurvivalTargets:
    """``targets`` censored administratively between the last evaluation time and the last training time.

    scikit-survival weights each test event by the training censoring distribution at its time and
    refuses times past the last training time. A bag followed beyond every evaluation time is a survivor
    at all of them either way, so censoring it there changes no Brier score or time-dependent AUC; it
    only lets test bags followed longer than the training bags be scored."""
    if times.size == 0 or targets.time.max() < train.time.max():
        return targets
    cut = 0.5 * (float(times.max()) + float(train.time.max()))
    if not times.max() < cut < train.time.max():
        return targets
    late = targets.time > cut
    return SurvivalTargets(np.where(late, cut, targets.time), targets.event & ~late)


def td_auc(train: SurvivalTargets, targets: SurvivalTargets, risk: Any, times: np.ndarray) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic AUC at each of ``times`` and their (survival-weighted) mean; NaN when undefined."""
    r = _risk(risk, len(targets), "time-dependent AUC")
    if times.size == 0:
        return np.full(0, math.nan), math.nan
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test = inside_training_follow_up(train, targets, times).structured()
            from sksurv.metrics import cumulative_dynamic_auc
            aucs, mean = cumulative_dynamic_auc(train.structured(), test, r, times)
        return np.asarray(aucs, dtype=np.float64), float(mean)
    except (ValueError, ZeroDivisionError):
        return np.full(times.size, math.nan), math.nan


def ibs(train: SurvivalTargets, targets: SurvivalTargets, survival: np.ndarray, times: np.ndarray) -> float:
    """Integrated Brier score of survival probabilities ``survival`` (n, len(times)); NaN when undefined."""
    if times.size < 2:
        return math.nan
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test = inside_training_follow_up(train, targets, times).structured()
            from sksurv.metrics import integrated_brier_score
            return float(integrated_brier_score(train.structured(), test, survival, times))
    except (ValueError, ZeroDivisionError):
        return math.nan


def breslow_survival(train: SurvivalTargets, train_risk: Any, risk: Any, times: np.ndarray) -> np.ndarray:
    """Survival probabilities S(t | risk) = S0(t) ** exp(risk) at ``times`` (n, len(times)), with the
    Breslow baseline S0 fitted on the training bags' Cox risks (log hazard ratios) and targets.
    Times past the last training time are refused by scikit-survival, so callers pass times inside it;
    no times (a test set without usable events) give an (n, 0) array."""
    tr = _risk(train_risk, len(train), "Breslow baseline")
    r = _risk(risk, np.asarray(risk).size, "Breslow survival")
    if not train.event.any():
        raise HistomilError("Breslow baseline: the training bags hold no event")
    if np.asarray(times).size == 0:  # scikit-survival's step function cannot take an empty array
        return np.ones((r.size, 0))
    from sksurv.linear_model.coxph import BreslowEstimator
    est = BreslowEstimator().fit(tr, train.event, train.time)
    times = np.minimum(np.asarray(times, dtype=np.float64), train.time.max())
    base = np.asarray(est.baseline_survival_(times), dtype=np.float64)
    return base[None, :] ** np.exp(r)[:, None]


def survival_metrics(
    targets: SurvivalTargets,
    risk: Any,
    train: SurvivalTargets | None = None,
    times: np.ndarray | None = None,
    survival: np.ndarray | None = None,
    tau: float | None = None,
) -> dict[str, float]:
    """Every survival metric of one set of predictions (see the module docstring).

    ``train``: the training targets (for the censoring distribution); None uses ``targets`` itself.
    ``times``: evaluation times (default :func:`evaluation_times` of ``targets``); ``survival``:
    probabilities (n, len(times)) for the integrated Brier score (left out when None).
    """
    train = train or targets
    times = evaluation_times(targets) if times is None else np.asarray(times, dtype=np.float64)
    tau = _tau(times, tau)
    out = {
        "cindex_harrell": cindex_harrell(targets, risk),
        "cindex_uno": cindex_uno(train, targets, risk, tau),
        "td_auc": td_auc(train, targets, risk, times)[1],
    }
    if survival is not None:
        out["ibs"] = ibs(train, targets, _survival_matrix(survival, len(targets), times), times)
    return out


def _tau(times: np.ndarray, tau: float | None) -> float | None:
    if tau is not None:
        return float(tau)
    return float(times[-1]) if times.size else None


def _survival_matrix(survival: Any, n: int, times: np.ndarray) -> np.ndarray:
    s = np.asarray(survival, dtype=np.float64)
    if s.shape != (n, times.size):
        raise HistomilError(f"survival probabilities: expected shape ({n}, {times.size}), got {s.shape}")
    if not np.all(np.isfinite(s)) or (s.size and (s.min() < 0 or s.max() > 1)):
        raise HistomilError("survival probabilities must lie in [0, 1]")
    return s


def survival_bootstrap_ci(
    targets: SurvivalTargets,
    risk: Any,
    train: SurvivalTargets | None = None,
    times: np.ndarray | None = None,
    survival: np.ndarray | None = None,
    tau: float | None = None,
    n_resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float | int]]:
    """Point estimate and percentile bootstrap interval of each metric, resampling bags.

    The evaluation times and ``tau`` are fixed from all bags; the censoring distribution stays the
    training one. Each resample runs scikit-survival's estimators afresh (about 0.05-0.09 s for 300
    bags on a shared 2-core AMD EPYC), hence 200 resamples by default rather than the 1,000 of
    :func:`histomil.evaluation.bootstrap.bootstrap_ci`. Returns ``{metric: {"value", "low", "high", "n_valid", "n_skipped"}}`` as
    :func:`histomil.evaluation.bootstrap.bootstrap_ci` does.
    """
    if int(n_resamples) < 1:
        raise HistomilError(f"bootstrap: n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise HistomilError(f"bootstrap: level must lie in (0, 1), got {level}")
    r = _risk(risk, len(targets), "survival bootstrap")
    train = train or targets
    times = evaluation_times(targets) if times is None else np.asarray(times, dtype=np.float64)
    tau = _tau(times, tau)
    s = _survival_matrix(survival, len(targets), times) if survival is not None else None
    point = survival_metrics(targets, r, train, times, s, tau)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in point}
    n = len(targets)
    for _ in range(int(n_resamples)):
        idx = rng.integers(0, n, size=n)
        sub = targets.subset(idx)
        values = survival_metrics(sub, r[idx], train, times, s[idx] if s is not None else None, tau)
        for m, v in values.items():
            samples[m].append(v)
    return {m: percentile_interval(point[m], np.asarray(samples[m]), level) for m in point}


def percentile_interval(value: float, samples: np.ndarray, level: float) -> dict[str, float | int]:
    """``value`` with the percentile interval of the finite ``samples`` (NaN ones are skipped and counted)."""
    ok = samples[np.isfinite(samples)]
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    low, high = np.percentile(ok, [lo_q, hi_q]).tolist() if ok.size else (math.nan, math.nan)
    return {"value": float(value), "low": float(low), "high": float(high),
            "n_valid": int(ok.size), "n_skipped": int(samples.size - ok.size)}

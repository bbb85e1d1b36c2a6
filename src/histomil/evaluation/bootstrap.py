"""Bootstrap confidence intervals over bags, and mean / standard deviation over repeated runs.

A bootstrap resample draws ``n`` bags with replacement from the ``n`` evaluated bags. Rather than
copying arrays, each resample is held as a row of counts (how often each bag was drawn), and every
metric is computed from those counts with matrix products, so 1,000 resamples of a few thousand
bags take well under a second:

* thresholded metrics from the weighted confusion counts ``tp, fp, fn, tn``;
* ROC-AUC as the weighted Mann-Whitney statistic over distinct score levels (ties count one half);
* PR-AUC as average precision, sum over score levels of (recall step) x (precision), which is what
  scikit-learn's ``average_precision_score`` computes.

For repeated runs (cross-validation folds x seeds), :func:`bootstrap_mean_ci` resamples the bags
of every run and averages the runs' metrics, giving an interval for the mean over runs.

A resample in which a metric is undefined (no positive bag for recall, one class only for the
AUCs) is skipped for that metric and counted in ``n_skipped``; the interval is the percentile
interval of the remaining resamples. The point estimate ``value`` is the metric on all bags.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.evaluation.metrics import check_binary_inputs

METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision", "recall", "f1")
_KNOWN = set(METRICS) | {"specificity"}
_CHUNK_CELLS = 2_000_000  # resamples x bags held in memory at once


class _Prepared:
    """Bags sorted by score and grouped into distinct score levels, for the AUC sums."""

    def __init__(self, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> None:
        order = np.argsort(p, kind="stable")
        self.order = order
        ps = p[order]
        self.starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # first bag of each level (ascending)
        self.y_sorted = y[order].astype(np.float64)
        self.masks = {
            "tp": (y == 1) & pred,
            "fn": (y == 1) & ~pred,
            "fp": (y == 0) & pred,
            "tn": (y == 0) & ~pred,
        }


def _div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _metrics_from_counts(w: np.ndarray, prep: _Prepared, wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """Every wanted metric for each row of bag weights ``w`` (R, n); NaN where undefined."""
    wanted = set(wanted)
    c = {k: w @ m.astype(np.float64) for k, m in prep.masks.items()}
    tp, fn, fp, tn = c["tp"], c["fn"], c["fp"], c["tn"]
    n_pos, n_neg = tp + fn, fp + tn
    total = n_pos + n_neg
    out: dict[str, np.ndarray] = {}
    recall = _div(tp, n_pos, math.nan)
    specificity = _div(tn, n_neg, math.nan)
    if "accuracy" in wanted:
        out["accuracy"] = _div(tp + tn, total, math.nan)
    if "recall" in wanted:
        out["recall"] = recall
    if "specificity" in wanted:
        out["specificity"] = specificity
    if "balanced_accuracy" in wanted:  # mean of the defined ones, as binary_metrics does
        both = np.stack([recall, specificity])
        n_def = np.isfinite(both).sum(axis=0)
        out["balanced_accuracy"] = _div(np.nansum(both, axis=0), n_def.astype(np.float64), math.nan)
    if "precision" in wanted:
        out["precision"] = _div(tp, tp + fp, 0.0)
    if "f1" in wanted:
        out["f1"] = _div(2 * tp, 2 * tp + fp + fn, 0.0)
    if wanted & {"roc_auc", "pr_auc"}:
        ws = w[:, prep.order]
        pos = np.add.reduceat(ws * prep.y_sorted, prep.starts, axis=1)  # (R, levels), ascending score
        neg = np.add.reduceat(ws * (1.0 - prep.y_sorted), prep.starts, axis=1)
        both_classes = (n_pos > 0) & (n_neg > 0)
        if "roc_auc" in wanted:
            below = np.cumsum(neg, axis=1) - neg
            u = (pos * (below + 0.5 * neg)).sum(axis=1)
            auc = _div(u, n_pos * n_neg, math.nan)
            out["roc_auc"] = np.where(both_classes, auc, math.nan)
        if "pr_auc" in wanted:
            tp_at = np.cumsum(pos[:, ::-1], axis=1)  # descending score: positives at or above each level
            fp_at = np.cumsum(neg[:, ::-1], axis=1)
            prec = _div(tp_at, tp_at + fp_at, 0.0)
            ap = (pos[:, ::-1] * prec).sum(axis=1)
            out["pr_auc"] = np.where(both_classes, _div(ap, n_pos, math.nan), math.nan)
    return out


def _thresholds(threshold: Any, n: int) -> np.ndarray:
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(n, float(t))
    if t.shape != (n,) or not np.all(np.isfinite(t)):
        raise HistomilError(f"bootstrap: threshold must be one finite number or one per bag ({n}), got shape {t.shape}")
    return t


def _check_args(metrics: Sequence[str], n_resamples: int, level: float) -> None:
    unknown = [m for m in metrics if m not in _KNOWN]
    if unknown:
        raise HistomilError(f"bootstrap: unknown metric {unknown[0]!r}; known: {', '.join(sorted(_KNOWN))}")
    if int(n_resamples) < 1:
        raise HistomilError(f"bootstrap: n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise HistomilError(f"bootstrap: level must lie in (0, 1), got {level}")


def _resampled(
    y: Any, prob: Any, threshold: Any, n_resamples: int, rng: np.random.Generator, metrics: Sequence[str]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(metric on all bags, metric on each of ``n_resamples`` bootstrap resamples of the bags)."""
    yy, p = check_binary_inputs(y, prob, "bootstrap")
    n = yy.size
    prep = _Prepared(yy, p, p >= _thresholds(threshold, n))
    point = {m: float(v[0]) for m, v in _metrics_from_counts(np.ones((1, n)), prep, metrics).items()}
    chunk = max(1, min(int(n_resamples), _CHUNK_CELLS // max(n, 1)))
    values: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    done = 0
    while done < n_resamples:
        r = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(r, n))
        counts = np.bincount((idx + (np.arange(r) * n)[:, None]).ravel(), minlength=r * n).reshape(r, n)
        for m, v in _metrics_from_counts(counts.astype(np.float64), prep, metrics).items():
            values[m].append(v)
        done += r
    return point, {m: np.concatenate(v) for m, v in values.items()}


def _interval(value: float, samples: np.ndarray, level: float) -> dict[str, float | int]:
    ok = samples[np.isfinite(samples)]
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    low, high = np.percentile(ok, [lo_q, hi_q]).tolist() if ok.size else (math.nan, math.nan)
    return {"value": float(value), "low": float(low), "high": float(high),
            "n_valid": int(ok.size), "n_skipped": int(samples.size - ok.size)}


def bootstrap_ci(
    y: Any,
    prob: Any,
    threshold: float | Sequence[float] | np.ndarray = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
    level: float = 0.95,
) -> dict[str, dict[str, float | int]]:
    """Point estimate and percentile bootstrap interval of each metric, resampling bags.

    ``threshold`` is one number, or one per bag when predictions of several models (e.g. the folds
    of a cross-validation, each with its own validation threshold) are pooled. Returns
    ``{metric: {"value", "low", "high", "n_valid", "n_skipped"}}``; ``n_skipped`` counts resamples
    where the metric was undefined (e.g. one class only, for the AUCs).
    """
    _check_args(metrics, n_resamples, level)
    point, samples = _resampled(y, prob, threshold, int(n_resamples), np.random.default_rng(seed), metrics)
    return {m: _interval(point[m], samples[m], level) for m in metrics}


def bootstrap_mean_ci(
    runs: Sequence[tuple[Any, Any, float | Sequence[float] | np.ndarray]],
    n_resamples: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
    level: float = 0.95,
) -> dict[str, dict[str, float | int]]:
    """Bootstrap interval of the MEAN of a metric over runs, resampling bags within each run.

    ``runs`` holds one ``(y, prob, threshold)`` per run (e.g. per fold and seed, each evaluated by
    its own model at its own threshold). Each bootstrap replicate resamples every run's bags and
    averages the runs' metrics, so the interval belongs to the same number as the mean over runs
    and never mixes the score scales of different models (as one AUC over pooled predictions
    would). Runs where a metric is undefined on all their bags are left out of that metric
    (``n_runs`` says how many counted); a replicate where it is undefined in any counted run is
    skipped. Returns ``{metric: {"value", "low", "high", "n_valid", "n_skipped", "n_runs"}}``.
    """
    _check_args(metrics, n_resamples, level)
    if not runs:
        raise HistomilError("bootstrap: no runs given")
    rng = np.random.default_rng(seed)
    per_run = [_resampled(y, p, t, int(n_resamples), rng, metrics) for y, p, t in runs]
    out: dict[str, dict[str, float | int]] = {}
    for m in metrics:
        used = [(pt[m], smp[m]) for pt, smp in per_run if math.isfinite(pt[m])]
        if not used:
            out[m] = {**_interval(math.nan, np.full(int(n_resamples), math.nan), level), "n_runs": 0}
            continue
        value = float(np.mean([v for v, _ in used]))
        stacked = np.stack([smp for _, smp in used])  # (runs, resamples)
        means = stacked.mean(axis=0)  # NaN (skipped) where any run's replicate is undefined
        out[m] = {**_interval(value, means, level), "n_runs": len(used)}
    return out


def summarize_runs(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, dict[str, float | int]]:
    """Mean and sample standard deviation (ddof=1) of each metric over runs (e.g. folds x seeds).

    Missing, None or NaN values (a metric undefined in a run) are left out and ``n`` says how many
    runs counted; the std of a single run is NaN.
    """
    out: dict[str, dict[str, float | int]] = {}
    for m in metrics:
        vals = []
        for r in runs:
            v = r.get(m)
            if v is not None and isinstance(v, (int, float, np.number)) and math.isfinite(float(v)):
                vals.append(float(v))
        arr = np.asarray(vals, dtype=np.float64)
        out[m] = {
            "mean": float(arr.mean()) if arr.size else math.nan,
            "std": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
            "n": int(arr.size),
        }
    return out

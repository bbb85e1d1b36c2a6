"""Summaries of a cross-validation's folds, shared by the tile study and the cohort: per-fold prediction
files, mean / std over runs with bootstrap intervals, pooled metrics, calibration, plots and the markdown.

Per test set over all runs: mean and standard deviation over runs, a bootstrap 95% interval of that
mean (bags resampled within each run, :func:`~.bootstrap.bootstrap_mean_ci`), and the metrics of all
predictions pooled together (each bag keeps its own run's threshold) with their bootstrap interval;
also calibration (ECE and a reliability diagram) and ROC / PR curves of the pooled predictions.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import METRICS, bootstrap_ci, bootstrap_mean_ci, summarize_runs
from histomil.evaluation.calibration import expected_calibration_error, plot_reliability
from histomil.evaluation.threshold import ThresholdConfig, describe_rule
from histomil.files import write_text
from histomil.reports.plots import plot_roc_pr

ATTENTION_KEYS = ("tile_auc_pooled", "tile_auc_mean", "top1_hit", "top1_hit_random")
PredictionsPath = Callable[[Mapping[str, Any], str], Path]  # (fold record, test set name) -> its predictions CSV


def write_predictions(path: Path, bag_ids: Sequence[str], y: np.ndarray, prob: np.ndarray, threshold: float) -> None:
    """One row per bag: bag_id, y_true, prob_positive, y_pred (prob >= threshold), threshold."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bag_id", "y_true", "prob_positive", "y_pred", "threshold"])
    for b, t, p in zip(bag_ids, y.tolist(), prob.tolist()):
        w.writerow([b, t, repr(float(p)), int(p >= threshold), repr(float(threshold))])
    write_text(path, buf.getvalue())


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, prob_positive, threshold) arrays from a predictions CSV written here."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        y = np.array([int(r["y_true"]) for r in rows], dtype=np.int64)
        p = np.array([float(r["prob_positive"]) for r in rows], dtype=np.float64)
        t = np.array([float(r["threshold"]) for r in rows], dtype=np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise HistomilError(f"{path}: unreadable predictions ({exc}); delete the fold's metrics.json to redo it") from None
    return y, p, t


def runs_by_test_set(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Each test set named in the fold records (in order of first appearance) -> the records that scored it."""
    names: list[str] = []
    for r in records:
        names += [n for n in r["test_sets"] if n not in names]
    return {name: [r for r in records if name in r["test_sets"]] for name in names}


def summarize_folds(
    records: Sequence[Mapping[str, Any]],
    predictions: PredictionsPath,
    out: Path,
    threshold: ThresholdConfig,
    bootstrap_resamples: int,
    calibration_bins: int,
    plots: bool = True,
) -> dict[str, Any]:
    """Combine the fold records per test set: mean/std over runs, bootstrap CIs, ECE, plots (in ``out``, unless
    ``plots`` is False).

    Returns ``n_runs``, ``bootstrap_resamples``, ``calibration_bins``, ``threshold`` (rule and per-run
    statistics), ``test_sets`` and ``runs`` (one line per fold record)."""
    sets: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, runs in runs_by_test_set(records).items():
        per_run = [r["test_sets"][name] for r in runs]
        ys, ps, ts = [], [], []
        for r in runs:
            y, p, t = read_predictions(predictions(r, name))
            ys.append(y)
            ps.append(p)
            ts.append(t)
        y, p, t = np.concatenate(ys), np.concatenate(ps), np.concatenate(ts)
        curves[name] = (y, p)
        stats: dict[str, dict[str, Any]] = summarize_runs(per_run, METRICS)
        if bootstrap_resamples:
            mean_ci = bootstrap_mean_ci(list(zip(ys, ps, ts)), bootstrap_resamples, seed=0)
            pooled = bootstrap_ci(y, p, t, bootstrap_resamples, seed=0)
            for m in METRICS:
                stats[m].update({"low": mean_ci[m]["low"], "high": mean_ci[m]["high"], "n_skipped": mean_ci[m]["n_skipped"]})
                stats[m]["pooled"] = {k: pooled[m][k] for k in ("value", "low", "high", "n_skipped")}
        att_runs = [m["attention"] for m in per_run if "attention" in m]
        sets[name] = {
            "n_runs": len(runs),
            "n_bags_pooled": int(y.size),
            "n_pos_pooled": int(y.sum()),
            "metrics": stats,
            "attention": summarize_runs(att_runs, ATTENTION_KEYS) if att_runs else None,
            "ece": {
                "pooled": expected_calibration_error(y, p, calibration_bins),
                **summarize_runs([{"ece": m.get("ece")} for m in per_run], ("ece",))["ece"],
            },
        }
    if curves and plots:
        plot_roc_pr(curves, out / "roc_pr.png", title=f"pooled over {len(records)} runs")
        plot_reliability(curves, out / "reliability.png", calibration_bins,
                         title=f"reliability, pooled over {len(records)} runs")
    thresholds = [float(r["threshold"]) for r in records]
    return {
        "n_runs": len(records),
        "bootstrap_resamples": bootstrap_resamples,
        "calibration_bins": calibration_bins,
        "threshold": {
            "rule": threshold.rule,
            "value": threshold.value,
            "description": describe_rule(threshold.rule, threshold.value),
            "mean": float(np.mean(thresholds)) if thresholds else math.nan,
            "std": float(np.std(thresholds, ddof=1)) if len(thresholds) > 1 else math.nan,
            "min": min(thresholds, default=math.nan),
            "max": max(thresholds, default=math.nan),
        },
        "test_sets": sets,
        "runs": [
            {
                "seed": r["seed"],
                "fold": r["fold"],
                "threshold": r["threshold"],
                "best_epoch": r["best_epoch"],
                "epochs_run": r["epochs_run"],
                "n_patients": {k: len(v) for k, v in r["patients"].items()},
                "val_roc_auc": r["val"].get("roc_auc"),
                "test": {n: {m: s.get(m) for m in METRICS} for n, s in r["test_sets"].items()},
                **({"dir": r["dir"]} if "dir" in r else {}),
            }
            for r in records
        ],
    }


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{float(v):.{digits}f}" if v is not None and math.isfinite(float(v)) else "n/a"


def _cell(s: Mapping[str, Any]) -> str:
    text = f"{_fmt(s.get('mean'))} ± {_fmt(s.get('std'))}"
    if "low" in s:
        text += f" [{_fmt(s.get('low'))}, {_fmt(s.get('high'))}]"
    return text


def models_table(summary: Mapping[str, Any], keys: Sequence[str], about: str = "") -> list[str]:
    """Markdown lines of an evaluation of several models on one set of patients (``evaluate --table``):
    a row per model of ``summary["models"]`` (each metric with its 95% interval under ``ci``) and, when
    there is one, the row of ``summary["fold_models_mean"]`` (mean ± sd over the fold models). Only the
    ``keys`` some model has become columns; ``about`` is added after the slide count."""
    models = summary["models"]
    keys = [k for k in keys if any(k in m for m in models.values())]

    def with_ci(m: Mapping[str, Any], key: str) -> str:
        value, ci = m.get(key), (m.get("ci") or {}).get(key)
        if value is None or not math.isfinite(value):
            return "n/a"
        if ci and ci.get("low") is not None and math.isfinite(ci["low"]):
            return f"{value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
        return f"{value:.3f}"

    lines = [f"{summary['n_patients']} patients ({summary['n_slides']} slides{about}) of {summary['table']}; "
             f"95% bootstrap intervals over patients\n",
             "| model | patients | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    lines += [f"| {name} | {m['n_patients']} | " + " | ".join(with_ci(m, k) for k in keys) + " |"
              for name, m in models.items()]
    mean = summary.get("fold_models_mean")
    if mean:
        cells = [f"{mean[k]['mean']:.3f} ± {mean[k]['std']:.3f}" if k in mean and math.isfinite(mean[k]["mean"]) else "n/a"
                 for k in keys]
        lines.append("| fold models, mean ± sd | | " + " | ".join(cells) + " |")
    return lines


def crossval_markdown(summary: Mapping[str, Any]) -> str:
    """The report: bag-level table (mean ± std [95% CI of the mean]), instance level, calibration."""
    th = summary["threshold"]
    sets = summary["test_sets"]
    lines = [
        f"# Cross-validation: {summary['folds']} folds x {len(summary['seeds'])} seed(s) = {summary['n_runs']} runs",
        "",
        f"{summary.get('input_kind', 'Tile table')}: `{summary.get('tile_table') or summary.get('table')}`; {summary['n_patients']} patients"
        + (f", {summary['n_holdout_patients']} of them held out" if summary["n_holdout_patients"] else "")
        + (" (holdout_* rows)" if any(n.startswith("holdout") for n in sets) else "")
        + ". Folds are patient-disjoint; each run's threshold was chosen on its own validation patients.",
        "",
        (
            f"Threshold: {th['description']}; per run mean {_fmt(th['mean'])} ± {_fmt(th['std'])}"
            f" (range {_fmt(th['min'])} to {_fmt(th['max'])})."
        ),
        "",
        "Cells: mean ± standard deviation over runs"
        + (
            f" [95% bootstrap interval of the mean: bags resampled within each run, {summary['bootstrap_resamples']}"
            " resamples]. crossval.json also holds each metric of all runs' predictions pooled, with its interval."
            if summary["bootstrap_resamples"]
            else "."
        ),
        "",
        "| test set | bags | " + " | ".join(METRICS) + " |",
        "|---|---:|" + "|".join("---:" for _ in METRICS) + "|",
    ]
    for name, s in sets.items():
        lines.append(f"| {name} | {s['n_bags_pooled']} | " + " | ".join(_cell(s["metrics"][m]) for m in METRICS) + " |")
    if any(s.get("attention") for s in sets.values()):
        lines += [
            "",
            "## Instance level (attention against tile truth, positive bags; mean ± std over runs)",
            "",
            "| test set | tile ROC-AUC (pooled tiles) | tile ROC-AUC (mean per bag) | top-1 tile is tumour | random tile is tumour |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, s in sets.items():
            a = s.get("attention")
            if a:
                lines.append(f"| {name} | " + " | ".join(_cell(a[k]) for k in ATTENTION_KEYS) + " |")
    lines += [
        "",
        f"## Calibration (expected calibration error, {summary['calibration_bins']} equal-width bins)",
        "",
        "| test set | ECE pooled | ECE per run |",
        "|---|---:|---:|",
    ]
    for name, s in sets.items():
        lines.append(f"| {name} | {_fmt(s['ece']['pooled'])} | {_cell(s['ece'])} |")
    lines += ["", "Figures: `roc_pr.png` (ROC and PR, pooled), `reliability.png` (reliability diagram, pooled).", ""]
    return "\n".join(lines)


__all__ = ["ATTENTION_KEYS", "crossval_markdown", "models_table", "read_predictions", "summarize_folds", "write_predictions"]

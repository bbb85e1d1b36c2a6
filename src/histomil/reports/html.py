"""One self-contained HTML report of a finished run: metrics with intervals, curves, tile galleries.

Two kinds of run folder are understood:

* a study run (``histomil run`` / ``histomil demo``): ``evaluation/metrics.json`` and
  ``predictions_<set>.csv``, ``model/model.pt`` and ``history.csv``, ``features/<set>/*.h5`` and
  ``bags/<set>/tiles.csv``. Bootstrap 95% intervals (bags resampled) and the calibration error are
  computed here from the predictions;
* a cross-validation (``histomil crossval``): ``crossval.json`` and ``seed_<s>/fold_<f>/`` folders.
  The table is the one of ``crossval.json`` (mean ± std over runs [95% interval of the mean]);
  training and ROC curves are drawn per run, ROC / PR and reliability on the pooled predictions.

This module reads the run and lays out the page; the tile galleries of a few bags come from
:mod:`histomil.reports.galleries`, the page's pieces (figures, cells, CSS) from
:mod:`histomil.reports.html_blocks`. The HTML needs nothing but itself to open. Every figure is also
written as a PNG to ``<report name>_figures/`` beside the HTML. All files are written atomically.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomil.callbacks import Log
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import METRICS, bootstrap_ci
from histomil.evaluation.calibration import expected_calibration_error, plot_reliability
from histomil.files import write_bytes, write_text
from histomil.reports.galleries import Models, build_gallery, choose_bags
from histomil.reports.html_blocks import (
    BagRef,
    Figure,
    esc,
    figure_html,
    file_figure,
    fmt,
    gallery_section,
    metric_cell,
    page,
    plot_runs_roc,
    plot_runs_training,
)
from histomil.reports.plots import plot_confusion_matrix, plot_roc_pr, plot_training_curves
from histomil.reports.target_cv_report import build_target_cv_report, target_cv_summary
from histomil.reports.task_report import build_task_report, task_metrics_file


ATTENTION_KEYS = ("tile_auc_pooled", "tile_auc_mean", "top1_hit", "top1_hit_random")
METRIC_TITLES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "f1": "F1",
    "tile_auc_pooled": "tile ROC-AUC (pooled tiles)",
    "tile_auc_mean": "tile ROC-AUC (mean per bag)",
    "top1_hit": "top-1 tile is tumour",
    "top1_hit_random": "random tile is tumour",
}


# --------------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HistomilError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HistomilError(f"{path}: unreadable JSON ({exc})") from None


def read_predictions_csv(path: Path, default_threshold: float | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(bag ids, y_true, prob_positive, threshold) from a predictions CSV of ``evaluate`` or ``crossval``.

    The threshold column is optional (``histomil evaluate`` writes one threshold in metrics.json);
    without it ``default_threshold`` is used.
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise HistomilError(f"{path}: predictions not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise HistomilError(f"{path}: unreadable predictions ({exc})") from None
    if not rows:
        raise HistomilError(f"{path}: no predictions")
    try:
        ids = [str(r["bag_id"]) for r in rows]
        y = np.array([int(r["y_true"]) for r in rows], dtype=np.int64)
        p = np.array([float(r["prob_positive"]) for r in rows], dtype=np.float64)
        if "threshold" in rows[0]:
            t = np.array([float(r["threshold"]) for r in rows], dtype=np.float64)
        elif default_threshold is not None:
            t = np.full(len(rows), float(default_threshold))
        else:
            raise KeyError("threshold")
    except KeyError as exc:
        raise HistomilError(f"{path}: no column {exc.args[0]!r} (expected bag_id, y_true, prob_positive)") from None
    except (TypeError, ValueError) as exc:
        raise HistomilError(f"{path}: a value is not a number ({exc})") from None
    if not np.all(np.isin(y, (0, 1))):
        raise HistomilError(f"{path}: y_true must be 0 or 1")
    if not (np.all(np.isfinite(p)) and p.min() >= -1e-6 and p.max() <= 1 + 1e-6):
        raise HistomilError(f"{path}: prob_positive must be probabilities in [0, 1]")
    return ids, y, np.clip(p, 0.0, 1.0), t


def _read_history(path: Path) -> dict[str, np.ndarray] | None:
    """history.csv as float columns (unparseable cells -> NaN); None when missing or empty."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not rows or "epoch" not in rows[0]:
        return None

    def num(text: Any) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan

    return {k: np.array([num(r.get(k)) for r in rows]) for k in rows[0] if k}


# --------------------------------------------------------------------------------------------
# Study run
# --------------------------------------------------------------------------------------------


def _study_report(run: Path, fig_dir: Path, named: Sequence[str], max_bags: int, max_tiles: int,
                  n_resamples: int, log: Log) -> tuple[str, list[Figure]]:
    ev = run / "evaluation"
    doc = _read_json(ev / "metrics.json")
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict) or not results:
        raise HistomilError(f"{ev / 'metrics.json'}: no 'results' per test set; not written by 'histomil evaluate'")
    threshold = float(doc.get("threshold", 0.5))
    model_path = run / "model" / "model.pt"
    cfg = _read_json(run / "config.json") if (run / "config.json").is_file() else {}
    timings = _read_json(run / "timings.json") if (run / "timings.json").is_file() else {}

    preds: dict[str, tuple[list[str], np.ndarray, np.ndarray, np.ndarray]] = {}
    cis: dict[str, dict[str, Any]] = {}
    eces: dict[str, float] = {}
    for name, m in results.items():
        ids, y, p, t = read_predictions_csv(ev / f"predictions_{name}.csv", threshold)
        if len(ids) != int(m.get("n", len(ids))):
            raise HistomilError(f"{ev / f'predictions_{name}.csv'}: {len(ids)} bags but metrics.json says {m.get('n')}")
        preds[name] = (ids, y, p, t)
    candidates = []
    for name, (ids, y, p, t) in preds.items():
        for i, bid in enumerate(ids):
            candidates.append(BagRef(
                run="", set_name=name, bag_id=bid, y=int(y[i]), p=float(p[i]), threshold=float(t[i]),
                model_path=model_path, feature_file=run / "features" / name / f"{bid}.h5",
                bag_dir=run / "bags" / name / bid,
                truth_csv=next((c for c in (run / "bags" / name / "tiles.csv", run / "features" / name / "tiles.csv") if c.is_file()), None),
                cache_dir=None,
            ))
    chosen = choose_bags(candidates, named, max_bags)  # unknown --bag names fail before any work
    for name, (ids, y, p, t) in preds.items():
        cis[name] = bootstrap_ci(y, p, t, n_resamples, seed=0) if n_resamples > 0 else {}
        eces[name] = expected_calibration_error(y, p, 10)
    log(f"bootstrap intervals: {n_resamples} resamples per test set")

    # --- table
    head = "<tr><th>test set</th><th>bags (pos)</th>" + "".join(f"<th>{esc(METRIC_TITLES[m])}</th>" for m in METRICS)
    head += "<th>ECE</th></tr>"
    rows = []
    for name, m in results.items():
        cells = [f'<td class="name">{esc(name)}</td><td>{int(m.get("n", 0))} ({int(m.get("n_pos", 0))})</td>']
        for k in METRICS:
            ci = cis[name].get(k, {})
            cells.append(metric_cell(name, k, m.get(k), ci.get("low"), ci.get("high")) if ci else metric_cell(name, k, m.get(k)))
        cells.append(metric_cell(name, "ece", eces[name]))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<div class="scroll"><table class="metrics" id="metrics-table">{head}{"".join(rows)}</table></div>'
    ci_note = (
        f"Cells: value on all bags of the test set [95% bootstrap percentile interval, bags resampled,"
        f" {n_resamples} resamples]. " if n_resamples > 0 else "No bootstrap intervals. "
    )
    sec = [
        '<h2 id="metrics">Bag-level metrics</h2>'
        f'<p class="note">{ci_note}A bag is called tumour when P(tumour) &ge; {threshold:.3f} (the threshold fixed'
        " before testing). ECE: expected calibration error, 10 equal-width bins.</p>" + table
    ]
    att_rows = [(n, m["attention"]) for n, m in results.items() if isinstance(m.get("attention"), dict)]
    if att_rows:
        h = "<tr><th>test set</th><th>positive bags</th>" + "".join(f"<th>{esc(METRIC_TITLES[k])}</th>" for k in ATTENTION_KEYS) + "</tr>"
        r = "".join(
            f'<tr><td class="name">{esc(n)}</td><td>{int(a.get("n_pos_bags", 0))}</td>'
            + "".join(metric_cell(n, k, a.get(k)) for k in ATTENTION_KEYS) + "</tr>"
            for n, a in att_rows
        )
        sec.append(
            '<h3 id="instance">Instance level: attention against tile truth (positive bags)</h3>'
            f'<table class="attention">{h}{r}</table>'
        )

    # --- figures
    figs: list[Figure] = []
    meta: dict[str, Any] = {}
    if model_path.is_file():
        from histomil.training.checkpoint import read_checkpoint_dict

        ck = read_checkpoint_dict(model_path)
        meta = {**(ck.get("extra") or {}), "model_name": ck.get("model_name"), "encoder_info": ck.get("encoder_info")}
    history = run / "model" / "history.csv"
    if history.is_file():
        figs.append(file_figure(
            "training_curves", "training curves",
            lambda p: plot_training_curves(history, p, best_epoch=meta.get("best_epoch")), fig_dir,
            "Training curves: loss and accuracy / validation AUC per epoch; dashed line at the best epoch (the saved model).",
        ))
    curves = {n: (v[1], v[2]) for n, v in preds.items()}
    figs.append(file_figure("roc_pr", "ROC and PR curves", lambda p: plot_roc_pr(curves, p), fig_dir,
                             "ROC (left) and precision-recall (right) per test set; dotted: chance."))
    for n, m in results.items():
        if "confusion_matrix" in m:
            figs.append(file_figure(
                f"confusion_{n}", f"confusion matrix {n}",
                lambda p, n=n, m=m: plot_confusion_matrix(m["confusion_matrix"], p, title=n), fig_dir,
                f"{n}: rows truth, columns prediction; colour: row fraction.", "small",
            ))
    figs.append(file_figure("reliability", "reliability diagram", lambda p: plot_reliability(curves, p, 10), fig_dir,
                             "Reliability diagram (10 equal-width bins) with each test set's ECE; bottom: bags per bin.", "medium"))

    # --- galleries
    models = Models()
    galleries = [build_gallery(b, models, max_tiles) for b in chosen]
    log(f"tile galleries: {len(galleries)} bags")

    # --- header
    st = cfg.get("study", {}) if isinstance(cfg, dict) else {}
    tr = cfg.get("train", {}) if isinstance(cfg, dict) else {}
    fe = cfg.get("features", {}) if isinstance(cfg, dict) else {}
    facts = [
        f"model <b>{esc(meta.get('model_name') or tr.get('model', '?'))}</b>",
        f"encoder <b>{esc((meta.get('encoder_info') or {}).get('name') or fe.get('encoder', '?'))}</b>",
    ]
    if st:
        facts.append(f"bags of {st.get('bag_size', '?')} tiles: {st.get('train_bags', '?')} train /"
                     f" {st.get('val_bags', '?')} validation / {st.get('test_bags', '?')} per test set")
    if meta.get("best_epoch") is not None:
        facts.append(f"best epoch {meta['best_epoch']}")
    if timings:
        facts.append("wall time " + ", ".join(f"{esc(k)} {float(v):.0f} s" for k, v in timings.items()))
    sec.insert(0, f'<p class="meta">{"; ".join(facts)}.</p>')
    body = {"sections": sec, "figs": figs, "galleries": galleries}
    return _assemble("study run", run, body, fig_dir), figs


# --------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------


def _crossval_sources(run: Path, seed: int, fold: int, set_name: str) -> tuple[Path | None, Path | None, Path]:
    """(feature folder, bag folder, tiles.csv) of one run's test set; held-out sets live per seed."""
    fold_dir = run / f"seed_{seed}" / f"fold_{fold}"
    if set_name.startswith("holdout"):
        base = run / f"seed_{seed}" / "holdout"
        split = "test" + set_name.removeprefix("holdout")
    else:
        base, split = fold_dir, set_name
    return base / "features" / split, base / "bags" / split, base / "bags" / split / "tiles.csv"


def _crossval_report(run: Path, fig_dir: Path, named: Sequence[str], max_bags: int, max_tiles: int,
                     log: Log) -> tuple[str, list[Figure]]:
    summary = _read_json(run / "crossval.json")
    if not isinstance(summary, dict) or summary.get("format") != "histomil-crossval" or "test_sets" not in summary:
        raise HistomilError(f"{run / 'crossval.json'}: not a histomil cross-validation summary")
    sets: dict[str, Any] = summary["test_sets"]
    runs: list[dict[str, Any]] = summary.get("runs", [])
    if not sets or not runs:
        raise HistomilError(f"{run / 'crossval.json'}: no finished runs or test sets")
    th = summary.get("threshold", {})
    unit = str(summary.get("bag_level", "bag"))  # a cohort's bags are patients or slides; a tile study's are bags
    units = {"patient": "patients", "slide": "slides"}.get(unit, "bags")

    # --- table from crossval.json
    head = f"<tr><th>test set</th><th>runs</th><th>{units} (pos), pooled</th>"
    head += "".join(f"<th>{esc(METRIC_TITLES[m])}</th>" for m in METRICS) + "<th>ECE</th><th>ECE pooled</th></tr>"
    rows = []
    for name, s in sets.items():
        cells = [
            f'<td class="name">{esc(name)}</td><td>{int(s.get("n_runs", 0))}</td>',
            f'<td>{int(s.get("n_bags_pooled", 0))} ({int(s.get("n_pos_pooled", 0))})</td>',
        ]
        for m in METRICS:
            c = s["metrics"].get(m, {})
            cells.append(metric_cell(name, m, c.get("mean"), c.get("low") if "low" in c else None,
                                      c.get("high") if "high" in c else None, std=c.get("std")))
        e = s.get("ece", {})
        cells.append(metric_cell(name, "ece", e.get("mean"), std=e.get("std")))
        cells.append(metric_cell(name, "ece_pooled", e.get("pooled")))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<div class="scroll"><table class="metrics" id="metrics-table">{head}{"".join(rows)}</table></div>'
    n_boot = int(summary.get("bootstrap_resamples", 0))
    sec = [
        f'<p class="meta">{summary.get("folds")} patient-grouped folds &times; {len(summary.get("seeds", []))} seed(s)'
        f' = {summary.get("n_runs")} runs; {summary.get("n_patients", "?")} patients'
        + (f", {summary['n_holdout_patients']} held out" if summary.get("n_holdout_patients") else "")
        + f"; threshold: {esc(th.get('description', '?'))} (per run {fmt(th.get('mean'))} ± {fmt(th.get('std'))})."
        + (f" Total wall time {float(summary['wall_seconds']):.0f} s." if summary.get("wall_seconds") else "")
        + "</p>",
        f'<h2 id="metrics">{unit.capitalize()}-level metrics</h2><p class="note">Cells: mean ± standard deviation over runs'
        + (f" [95% bootstrap interval of the mean: {units} resampled within each run, {n_boot} resamples]" if n_boot else "")
        + ". ECE: expected calibration error per run (mean ± std) and of all runs' predictions pooled.</p>"
        + table,
    ]
    att_sets = [(n, s["attention"]) for n, s in sets.items() if s.get("attention")]
    if att_sets:
        h = "<tr><th>test set</th>" + "".join(f"<th>{esc(METRIC_TITLES[k])}</th>" for k in ATTENTION_KEYS) + "</tr>"
        r = "".join(
            f'<tr><td class="name">{esc(n)}</td>'
            + "".join(metric_cell(n, k, a.get(k, {}).get("mean"), std=a.get(k, {}).get("std")) for k in ATTENTION_KEYS)
            + "</tr>"
            for n, a in att_sets
        )
        sec.append('<h3 id="instance">Instance level: attention against tile truth (positive bags; mean ± std over runs)</h3>'
                   f'<table class="attention">{h}{r}</table>')
    # per-run table
    prow = "".join(
        f"<tr><td>{r['seed']}</td><td>{r['fold']}</td><td>{fmt(r.get('threshold'))}</td><td>{r.get('best_epoch')}</td>"
        f"<td>{r.get('epochs_run')}</td><td>{fmt(r.get('val_roc_auc'))}</td>"
        + "".join(f"<td>{fmt((r.get('test') or {}).get(n, {}).get('roc_auc'))}</td>" for n in sets)
        + "</tr>"
        for r in runs
    )
    sec.append(
        '<h3 id="runs">Runs</h3><table class="runs"><tr><th>seed</th><th>fold</th><th>threshold</th><th>best epoch</th>'
        "<th>epochs</th><th>val ROC-AUC</th>" + "".join(f"<th>{esc(n)} ROC-AUC</th>" for n in sets) + f"</tr>{prow}</table>"
    )

    # --- per-run predictions, histories, confusion matrices
    per_set: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {n: [] for n in sets}
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in sets}
    confusion: dict[str, np.ndarray] = {}
    histories: dict[str, dict[str, np.ndarray]] = {}
    best: dict[str, int | None] = {}
    candidates: list[BagRef] = []
    for r in runs:
        seed, fold = int(r["seed"]), int(r["fold"])
        label = str(r.get("dir") or f"seed_{seed}/fold_{fold}")  # cohort cross-validations name their folders
        fold_dir = run / label
        rec = _read_json(fold_dir / "metrics.json") if (fold_dir / "metrics.json").is_file() else {}
        model_dir = fold_dir / "model" if (fold_dir / "model").is_dir() else fold_dir  # cohort folds: model.pt in the fold
        h = _read_history(model_dir / "history.csv")
        if h is not None:
            histories[f"s{seed} f{fold}"] = h
            best[f"s{seed} f{fold}"] = r.get("best_epoch")
        for name in sets:
            pred_csv = fold_dir / f"predictions_{name}.csv"
            if not pred_csv.is_file():
                continue
            ids, y, p, t = read_predictions_csv(pred_csv)
            per_set[name].append((label, y, p))
            pooled[name].append((y, p))
            cm = (rec.get("test_sets") or {}).get(name, {}).get("confusion_matrix")
            if cm is not None:
                confusion[name] = confusion.get(name, np.zeros((2, 2), dtype=np.int64)) + np.asarray(cm, dtype=np.int64)
            feat_dir, bags_dir, truth = _crossval_sources(run, seed, fold, name)
            for i, bid in enumerate(ids):
                candidates.append(BagRef(
                    run=label, set_name=name, bag_id=bid, y=int(y[i]), p=float(p[i]), threshold=float(t[i]),
                    model_path=model_dir / "model.pt", feature_file=feat_dir / f"{bid}.h5" if feat_dir else None,
                    bag_dir=bags_dir / bid if bags_dir else None, truth_csv=truth, cache_dir=run / "cache",
                ))
    if not candidates:
        raise HistomilError(f"{run}: no per-run predictions (seed_*/fold_*/predictions_*.csv)")
    chosen = choose_bags(candidates, named, max_bags)  # unknown --bag names fail before any drawing

    figs: list[Figure] = []
    if histories:
        png = plot_runs_training(histories, best)
        figs.append(Figure("training_curves", "training curves per run", png,
                           "Training curves of every run (colour): loss, and validation ROC-AUC with the best epoch starred."))
    figs.append(Figure("roc_per_run", "ROC per run", plot_runs_roc({n: v for n, v in per_set.items() if v}),
                       "ROC curve of each run (its own model and test bags), one panel per test set."))
    curves = {n: (np.concatenate([y for y, _ in v]), np.concatenate([p for _, p in v])) for n, v in pooled.items() if v}
    figs.append(file_figure("roc_pr_pooled", "pooled ROC and PR", lambda p: plot_roc_pr(curves, p, title=f"pooled over {len(runs)} runs"),
                             fig_dir, "ROC and precision-recall of all runs' predictions pooled (scores of different models mixed)."))
    for n, cm in confusion.items():
        figs.append(file_figure(
            f"confusion_{n}", f"confusion matrix {n}",
            lambda p, n=n, cm=cm: plot_confusion_matrix(cm, p, title=f"{n}, summed over runs"), fig_dir,
            f"{n}: counts summed over runs, each at its own validation threshold.", "small",
        ))
    bins = int(summary.get("calibration_bins", 10))
    figs.append(file_figure("reliability", "reliability diagram", lambda p: plot_reliability(curves, p, bins), fig_dir,
                             f"Reliability diagram of the pooled predictions ({bins} bins), with the pooled ECE.", "medium"))
    for f in figs:
        if not (fig_dir / f"{f.key}.png").is_file():
            write_bytes(fig_dir / f"{f.key}.png", f.png)

    models = Models()
    galleries = [build_gallery(b, models, max_tiles) for b in chosen]
    log(f"tile galleries: {len(galleries)} bags")
    body = {"sections": sec, "figs": figs, "galleries": galleries}
    return _assemble("cross-validation", run, body, fig_dir), figs


# --------------------------------------------------------------------------------------------
# Assembling and writing
# --------------------------------------------------------------------------------------------


def _assemble(kind: str, run: Path, body: Mapping[str, Any], fig_dir: Path) -> str:
    figs: list[Figure] = body["figs"]
    rel = fig_dir.name
    groups = [
        ("training", "Training curves", [f for f in figs if f.key.startswith("training")]),
        ("curves", "ROC and precision-recall", [f for f in figs if f.key.startswith("roc")]),
        ("confusion", "Confusion matrices", [f for f in figs if f.key.startswith("confusion")]),
        ("calibration", "Calibration", [f for f in figs if f.key.startswith("reliability")]),
    ]
    sections = list(body["sections"])
    for anchor, title, group in groups:
        if group:
            sections.append(f'<h2 id="{anchor}">{title}</h2><div class="figs">' + "".join(figure_html(f, rel) for f in group) + "</div>")
    sections.append(gallery_section(body["galleries"]))
    nav = [("metrics", "Metrics")] + [(a, t) for a, t, g in groups if g] + [("galleries", "Tile galleries")]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = f"histomil report of a {kind}: <code>{esc(run)}</code>, made {when}"
    return page(f"histomil report: {run.name}", subtitle, nav, sections)


def run_kind(run_dir: Path) -> str:
    """``"crossval"`` or ``"study"``; a HistomilError for a folder that is neither."""
    if not run_dir.is_dir():
        raise HistomilError(f"{run_dir}: run folder not found")
    if (run_dir / "crossval.json").is_file():
        return "crossval"
    if (run_dir / "evaluation" / "metrics.json").is_file():
        return "study"
    raise HistomilError(
        f"{run_dir}: not a finished histomil run (no crossval.json, no evaluation/metrics.json);"
        " give the --out folder of 'histomil run', 'demo' or 'crossval'"
    )


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    bags: Iterable[str] = (),
    max_bags: int = 6,
    max_tiles: int = 40,
    n_resamples: int = 1000,
    log: Log | None = None,
    task: str | None = None,
) -> Path:
    """Write the HTML report of ``run_dir`` (default ``RUN_DIR/report.html``) and its PNGs; returns the HTML path.

    An evaluation of a multi-class, regression or survival model (``histomil evaluate`` output, or a run's
    ``evaluation/``) gets the report of :mod:`histomil.reports.task_report`, a regression or survival
    cross-validation that of :mod:`histomil.reports.target_cv_report`. ``task``: refuse a run of
    another task (a study run or cross-validation without a recorded task is a classification).

    ``bags`` names extra bags to show (see :func:`choose_bags`); ``max_bags`` bags are chosen
    automatically (half most confident, half most wrong), each showing at most ``max_tiles`` tiles.
    ``n_resamples`` bootstrap resamples give the intervals of a study run (a cross-validation's come
    from its crossval.json).
    """
    run = Path(run_dir)
    task_json = task_metrics_file(run) if run.is_dir() else None
    target_cv = target_cv_summary(run) if run.is_dir() and task_json is None else None
    if task_json is not None or target_cv is not None:  # a task evaluation; a regression or survival cross-validation
        out_path = Path(out) if out is not None else run / "report.html"
        if out_path.suffix.lower() not in (".html", ".htm"):
            raise HistomilError(f"{out_path}: the report is an HTML file; give a name ending in .html")
        if task_json is None:
            return build_target_cv_report(run, out_path, task)
        return build_task_report(task_json, out_path, task)
    kind = run_kind(run)
    record = _read_json(run / "crossval.json") if kind == "crossval" else {}
    recorded = record.get("task") if isinstance(record, dict) else None
    recorded = str((recorded.get("name") if isinstance(recorded, dict) else recorded) or "classification")
    if task is not None and task != recorded:
        raise HistomilError(f"{run}: a {recorded} run, not {task}")
    if max_bags < 0 or max_tiles < 1:
        raise HistomilError(f"--max-bags must be >= 0 and --max-tiles >= 1 (got {max_bags}, {max_tiles})")
    log = log or (lambda _m: None)
    out_path = Path(out) if out is not None else run / "report.html"
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise HistomilError(f"{out_path}: the report is an HTML file; give a name ending in .html")
    fig_dir = out_path.parent / f"{out_path.stem}_figures"  # created by the first figure written
    if kind == "study":
        page, _ = _study_report(run, fig_dir, list(bags), max_bags, max_tiles, n_resamples, log)
    else:
        page, _ = _crossval_report(run, fig_dir, list(bags), max_bags, max_tiles, log)
    write_text(out_path, page)
    log(f"report: {out_path} ({len(page.encode('utf-8')) / 1e6:.1f} MB), figures in {fig_dir}")
    return out_path


__all__ = ["build_report", "read_predictions_csv", "run_kind"]

"""HTML report of a regression or survival cross-validation (``histomil report CV_DIR``).

Two kinds of folder are understood:

* a cohort cross-validation (``crossval --table --task regression|survival``): ``metrics.json`` with
  ``"format": "histomil-cohort-crossval"`` (written by :mod:`histomil.evaluation.regression_cv` or
  :mod:`histomil.evaluation.survival_cv`), fold folders ``seed-S/fold-F/``, ``scatter_oof.png`` or
  ``km_pooled_seed-S.png`` and each fold's ``km_test.png``;
* a tile-study cross-validation of the tumour fraction (``crossval CONFIG`` with ``train.task
  regression``): ``crossval.json`` with ``"task": "regression"`` (:mod:`histomil.evaluation.study_regression`),
  fold folders ``seed_S/fold_F/`` and ``scatter.png``.

The page shows the numbers exactly as the JSON holds them (3 decimals): per-fold mean ± sd, the pooled
out-of-fold values with their bootstrap intervals, the held-out row when there is one, the per-fold
table, and every PNG the cross-validation wrote (top folder and fold folders), inlined as data URIs.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from histomil.errors import HistomilError
from histomil.files import write_text
from histomil.reports.html_blocks import esc, fmt, metric_cell, page

TITLES = {"mae": "MAE", "rmse": "RMSE", "r2": "R²", "pearson": "Pearson r", "spearman": "Spearman ρ",
          "cindex_harrell": "c-index (Harrell)", "cindex_uno": "c-index (Uno)", "td_auc": "time-dependent AUC",
          "ibs": "integrated Brier score"}
TASKS = ("regression", "survival")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def target_cv_summary(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(summary file, its content) of a regression or survival cross-validation in ``run_dir``; None otherwise."""
    cohort = _load(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else None
    if isinstance(cohort, dict) and cohort.get("format") == "histomil-cohort-crossval" and cohort.get("task") in TASKS:
        return run_dir / "metrics.json", cohort
    study = _load(run_dir / "crossval.json") if (run_dir / "crossval.json").is_file() else None
    if isinstance(study, dict) and study.get("format") == "histomil-crossval" and study.get("task") == "regression":
        return run_dir / "crossval.json", study
    return None


def _table(header: Sequence[str], rows: Sequence[str], table_id: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f'<div class="scroll"><table class="metrics"{ident}>{head}{"".join(rows)}</table></div>'


def _row(label: str, extra: str, cells: Sequence[str]) -> str:
    return f'<tr><td class="name">{esc(label)}</td><td>{esc(extra)}</td>{"".join(cells)}</tr>'


def _interval_cells(name: str, metrics: Sequence[str], doc: Mapping[str, Any]) -> list[str]:
    """Cells of ``{metric: {value, low, high}}`` (or a flat value with its interval under ``ci``)."""
    ci = doc.get("ci") if isinstance(doc.get("ci"), Mapping) else {}
    cells = []
    for m in metrics:
        entry = doc.get(m)
        if isinstance(entry, Mapping):
            cells.append(metric_cell(name, m, entry.get("value"), entry.get("low"), entry.get("high")))
        elif m in ci:
            cells.append(metric_cell(name, m, entry, ci[m].get("low"), ci[m].get("high")))
        else:
            cells.append(metric_cell(name, m, entry))
    return cells


def _mean_cells(name: str, metrics: Sequence[str], summary: Mapping[str, Any]) -> list[str]:
    return [metric_cell(name, m, (summary.get(m) or {}).get("mean"), std=(summary.get(m) or {}).get("std"))
            for m in metrics]


def _cohort_sections(doc: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(facts of the header, sections) of a cohort regression or survival cross-validation."""
    task = str(doc["task"])
    over_folds: Mapping[str, Any] = doc.get("mean_over_folds") or {}
    metrics = [m for m in TITLES if m in over_folds]
    folds: list[Mapping[str, Any]] = doc.get("per_fold") or []
    facts = [f"task <b>{esc(task)}</b> (loss {esc(doc.get('loss', '?'))})",
             f"{esc(doc.get('folds'))} patient-grouped folds &times; {len(doc.get('seeds') or [])} seed(s) = {len(folds)} runs",
             f"{esc(doc.get('n_patients', '?'))} patients, {esc(doc.get('n_slides', '?'))} slides"
             f" ({esc(doc.get('bag_level', 'patient'))} bags)"]
    if doc.get("n_holdout_patients"):
        facts.append(f"{esc(doc['n_holdout_patients'])} patients held out")
    if task == "regression":
        ts = doc.get("target_summary") or {}
        facts.append(f"target <b>{esc(doc.get('target'))}</b> from {fmt(ts.get('min'))} to {fmt(ts.get('max'))},"
                     f" mean {fmt(ts.get('mean'))}, sd {fmt(ts.get('sd'))}")
    else:
        ev = doc.get("patients_by_event") or {}
        facts.append(f"time <b>{esc(doc.get('time'))}</b>, event <b>{esc(doc.get('event'))}</b>"
                     f" ({esc(ev.get('event', '?'))} events, {esc(ev.get('censored', '?'))} censored)")
    rows = [_row(f"test folds: mean ± sd over {len(folds)}", "", _mean_cells("folds", metrics, over_folds))]
    for seed, p in (doc.get("pooled") or {}).items():
        n = f"{p.get('n_patients', '?')} patients" + (f", {p['events']} events" if "events" in p else "")
        rows.append(_row(f"pooled out-of-fold, {seed}", n, _interval_cells(f"pooled {seed}", metrics, p)))
    if doc.get("mean_over_seeds") and len(doc.get("seeds") or []) > 1:
        rows.append(_row("pooled: mean ± sd over seeds", "", _mean_cells("seeds", metrics, doc["mean_over_seeds"])))
    held = doc.get("holdout")
    if isinstance(held, Mapping):
        rows.append(_row(f"held out: {held.get('model', '')}", f"{held.get('n_patients', '?')} patients",
                         _interval_cells("holdout", metrics, held)))
    n_boot = int(doc.get("bootstrap_resamples") or 0)
    sections = ['<h2 id="metrics">Metrics</h2><p class="note">As written in metrics.json. Test folds: mean ± sample sd'
                " over the fold models' test patients. Pooled: every cross-validated patient once per seed"
                + (f" [95% bootstrap interval, patients resampled, {n_boot} resamples]" if n_boot else "") + ".</p>"
                + _table(["", "patients", *(TITLES[m] for m in metrics)], rows, "metrics-table")]
    if task == "survival":
        groups = [(s, p["risk_groups"]) for s, p in (doc.get("pooled") or {}).items() if isinstance(p.get("risk_groups"), Mapping)]
        if groups:
            lines = "".join(f"<li>{esc(s)}: log-rank p = {float(g.get('logrank_p', float('nan'))):.2g}; "
                            + ", ".join(f"{esc(k)} {esc(v.get('n'))} patients ({esc(v.get('events'))} events)"
                                        for k, v in (g.get("groups") or {}).items()) + "</li>" for s, g in groups)
            sections.append("<p class=\"note\">Pooled risk groups (each patient split at its own fold's training"
                            f" median risk):</p><ul>{lines}</ul>")
    fold_rows = [_row(f"seed {r.get('seed')} fold {r.get('fold')}",
                      f"{(r.get('n_patients') or {}).get('test', '?')} / best epoch {r.get('best_epoch')} of {r.get('epochs_run')}",
                      _interval_cells(f"fold {r.get('dir')}", metrics, r.get("metrics") or {})) for r in folds]
    sections.append('<h2 id="folds">Folds</h2>' + _table(["fold", "test patients / epochs", *(TITLES[m] for m in metrics)],
                                                          fold_rows, "folds-table"))
    return facts, sections


def _study_sections(doc: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(facts of the header, sections) of a tile-study regression cross-validation (crossval.json)."""
    sets: Mapping[str, Any] = doc.get("test_sets") or {}
    metrics = [m for m in TITLES if any(m in (s.get("metrics") or {}) for s in sets.values())]
    facts = ["task <b>regression</b>", f"target {esc(doc.get('target', 'tumour fraction'))}",
             f"{esc(doc.get('folds'))} patient-grouped folds &times; {len(doc.get('seeds') or [])} seed(s)"
             f" = {esc(doc.get('n_runs'))} runs", f"{esc(doc.get('n_patients', '?'))} patients"]
    if doc.get("n_holdout_patients"):
        facts.append(f"{esc(doc['n_holdout_patients'])} held out (the holdout_* sets)")
    rows = []
    for name, s in sets.items():
        ms = s.get("metrics") or {}
        rows.append(_row(f"{name}: mean ± sd over runs", f"{s.get('n_runs', '?')} runs", _mean_cells(name, metrics, ms)))
        pooled = {m: (ms.get(m) or {}).get("pooled") or {} for m in metrics}
        rows.append(_row(f"{name}: pooled", f"{s.get('n_bags_pooled', '?')} bags", _interval_cells(f"{name} pooled", metrics, pooled)))
    n_boot = int(doc.get("bootstrap_resamples") or 0)
    sections = ['<h2 id="metrics">Metrics</h2><p class="note">As written in crossval.json. Per test set: mean ± sample sd'
                " over runs, then all runs' predictions pooled"
                + (f" [95% bootstrap interval, bags resampled, {n_boot} resamples]" if n_boot else "") + ".</p>"
                + _table(["test set", "runs / bags", *(TITLES[m] for m in metrics)], rows, "metrics-table")]
    run_rows = [_row(f"seed {r.get('seed')} fold {r.get('fold')}", f"best epoch {r.get('best_epoch')} of {r.get('epochs_run')}",
                     _interval_cells(f"val {r.get('seed')}/{r.get('fold')}", metrics, r.get("val") or {}))
                for r in doc.get("runs") or []]
    sections.append('<h2 id="folds">Runs (validation bags)</h2>'
                    + _table(["run", "epochs", *(TITLES[m] for m in metrics)], run_rows, "folds-table"))
    return facts, sections


def figure_files(run_dir: Path, doc: Mapping[str, Any]) -> list[Path]:
    """Every PNG the cross-validation wrote: in its folder, then in each fold folder."""
    folds = doc.get("per_fold") or doc.get("runs") or []
    dirs = [run_dir / str(r.get("dir") or f"seed_{r.get('seed')}/fold_{r.get('fold')}") for r in folds]
    return sorted(run_dir.glob("*.png")) + [p for d in dirs for p in sorted(d.glob("*.png"))]


def build_target_cv_report(run_dir: Path, out: Path, expected_task: str | None = None) -> Path:
    """Write the HTML report of the regression or survival cross-validation in ``run_dir``; returns ``out``.
    ``expected_task``: refuse a cross-validation of another task (one error line)."""
    found = target_cv_summary(run_dir)
    if found is None:
        raise HistomilError(f"{run_dir}: not a regression or survival cross-validation")
    source, doc = found
    task = str(doc["task"])
    if expected_task is not None and expected_task != task:
        raise HistomilError(f"{run_dir}: a {task} cross-validation, not {expected_task}")
    facts, sections = (_cohort_sections if doc.get("format") == "histomil-cohort-crossval" else _study_sections)(doc)
    figs = [f'<figure class="fig"><img alt="{esc(p.name)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
            f"<figcaption>{esc(p.relative_to(run_dir).as_posix())}</figcaption></figure>" for p in figure_files(run_dir, doc)]
    if figs:
        sections.append('<h2 id="figures">Figures</h2><div class="figs">' + "".join(figs) + "</div>")
    sections.insert(0, f'<p class="meta">{"; ".join(facts)}.</p>')
    nav = [("metrics", "Metrics"), ("folds", "Folds")] + ([("figures", "Figures")] if figs else [])
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = f"{esc(task)} cross-validation <code>{esc(run_dir)}</code> ({esc(source.name)}), made {when}"
    write_text(out, page(f"histomil report: {run_dir.name}", subtitle, nav, sections))
    return out


__all__ = ["build_target_cv_report", "figure_files", "target_cv_summary"]

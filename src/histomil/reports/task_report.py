"""HTML report of an evaluation of a multi-class, regression or survival model (``histomil evaluate``).

:func:`histomil.evaluation.task_evaluate.evaluate_task_sets` writes ``metrics.json`` (with a ``task`` key),
``metrics.md`` and PNGs into one folder; this module turns that folder (or a run folder holding it as
``evaluation/``) into one self-contained HTML page: the headline metrics of every test set with their
95% bootstrap intervals, per-class tables (classification), where a survival model's risk-group cut and
censoring distribution came from, and every figure embedded.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from histomil.errors import HistomilError
from histomil.files import write_text

HEADLINE = {
    "classification": ("accuracy", "balanced_accuracy", "macro_roc_auc", "macro_pr_auc"),
    "regression": ("mae", "rmse", "r2", "pearson", "spearman"),
    "survival": ("cindex_harrell", "cindex_uno", "td_auc", "ibs"),
}
FIGURES = (("confusion_", "Confusion matrices"), ("roc_pr_", "One class vs the rest: ROC and precision-recall"),
           ("calibration_", "Calibration per class"), ("scatter", "Predicted vs true"), ("km_", "Kaplan-Meier risk groups"))
CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
       "img{max-width:100%;margin:0.5em 0}.ci{color:#666;font-size:0.85em}")


def task_metrics_file(run_dir: Path) -> Path | None:
    """The metrics.json of a task evaluation in ``run_dir`` (itself or ``evaluation/``), None when there is
    none or it belongs to a binary classifier (the study report's)."""
    for candidate in (run_dir / "metrics.json", run_dir / "evaluation" / "metrics.json"):
        if candidate.is_file():
            try:
                doc = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None  # the study report says what is wrong with it
            state = doc.get("task") if isinstance(doc, dict) else None
            if isinstance(state, dict):
                return candidate
    return None


def _cell(entry: Any) -> str:
    if isinstance(entry, Mapping) and isinstance(entry.get("value"), (int, float)):
        return f"{entry['value']:.3f} <span class=ci>[{entry['low']:.3f}, {entry['high']:.3f}]</span>" \
            if isinstance(entry.get("low"), (int, float)) else f"{entry['value']:.3f}"
    if isinstance(entry, (int, float)):
        return f"{entry:.3f}"
    return "n/a"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build_task_report(metrics_json: Path, out: Path, expected_task: str | None = None) -> Path:
    """Write the HTML report of the task evaluation whose ``metrics.json`` is given; returns ``out``.
    ``expected_task``: refuse an evaluation of another task (one error line)."""
    doc = json.loads(metrics_json.read_text())
    task = str(doc["task"].get("name", "classification"))
    if expected_task is not None and expected_task != task:
        raise HistomilError(f"{metrics_json}: an evaluation of a {task} model, not {expected_task}")
    if task not in HEADLINE:
        raise HistomilError(f"{metrics_json}: unknown task {task!r}")
    results: Mapping[str, Any] = doc.get("results") or {}
    columns = [c for c in HEADLINE[task] if any(c in m for m in results.values())]
    parts = ["<h2>Metrics (95% bootstrap intervals over bags)</h2>",
             _table(["test set", "n", *columns], [[html.escape(str(name)), str(m.get("n", "")), *(_cell(m.get(c)) for c in columns)]
                                                  for name, m in results.items()])]
    reference = doc.get("survival_reference")
    if isinstance(reference, Mapping) and reference.get("note"):  # where the risk-group cut and censoring came from
        parts.append(f"<p>Survival: {html.escape(str(reference['note']))} (source: {html.escape(str(reference.get('source', '')))}).</p>")
    if task == "classification":
        for name, m in results.items():
            rows = [[html.escape(c), str(p["n"]), _cell(p["roc_auc"]), _cell(p["pr_auc"]), _cell(p["recall"]),
                     _cell(p["precision"]), _cell(p["ece"])] for c, p in (m.get("per_class") or {}).items()]
            parts += [f"<h3>{html.escape(str(name))}: per class (one vs rest)</h3>",
                      _table(["class", "bags", "ROC-AUC", "PR-AUC", "recall", "precision", "ECE"], rows)]
    folder = metrics_json.parent
    for prefix, title in FIGURES:
        pngs = sorted(folder.glob(f"{prefix}*.png"))
        if pngs:
            parts.append(f"<h2>{title}</h2>")
            parts += [f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                      for p in pngs]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>histomil report: {html.escape(folder.name)}"
            f"</title><style>{CSS}</style></head><body><h1>histomil report: {task} model</h1>"
            f"<p>Evaluation <code>{html.escape(str(folder))}</code> of <code>{html.escape(str(doc.get('checkpoint', '')))}</code>, "
            f"made {when}.</p>" + "".join(parts) + "</body></html>\n")
    write_text(out, page)
    return out

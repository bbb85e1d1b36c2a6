"""Result tables in Markdown (the writers of report files are :mod:`histomil.files`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_COLUMNS = ("n", "accuracy", "roc_auc", "pr_auc", "precision", "recall", "f1")


def _cell(value: Any) -> str:
    """One table cell: ints as is, floats with 3 decimals, NaN/None/missing as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}" if math.isfinite(float(value)) else "n/a"
    return _escape(str(value))


def _escape(text: str) -> str:
    """Keep a cell on one line and inside its column."""
    return " ".join(text.split()).replace("|", "\\|")


def metrics_markdown(
    results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = DEFAULT_COLUMNS
) -> str:
    """A Markdown table with one row per test set (the keys of ``results``) and the given columns.

    Numbers are right-aligned; a metric that is missing, None or NaN shows as ``n/a``. The text ends
    with a newline.
    """
    if not columns:
        raise ValueError("metrics_markdown: at least one column is needed")
    header = "| test set | " + " | ".join(_escape(c) for c in columns) + " |"
    sep = "|---|" + "|".join("---:" for _ in columns) + "|"
    rows = [
        f"| {_escape(str(name))} | " + " | ".join(_cell(metrics.get(c)) for c in columns) + " |"
        for name, metrics in results.items()
    ]
    return "\n".join([header, sep, *rows]) + "\n"

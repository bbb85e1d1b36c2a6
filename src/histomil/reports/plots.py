"""Report figures: training curves, confusion matrices, ROC and PR curves.

Figures are built as ``matplotlib.figure.Figure`` objects on an explicit Agg canvas, never through
pyplot: nothing opens a window, the global backend of the caller's process is left alone, and no
figure lingers in pyplot's registry. Each PNG is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from histomil.errors import HistomilError
from histomil.evaluation.metrics import check_binary_inputs
from histomil.files import write_bytes

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """An empty figure (inches) on its own Agg canvas, outside pyplot; shared by every histomil plot."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """Render ``fig`` as PNG bytes, then drop the figure's contents."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        fig.clear()
    return buf.getvalue()


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    """Render ``fig`` to ``out_png`` atomically, then drop the figure's contents."""
    return write_bytes(out_png, figure_png(fig))


# ----------------------------------------------------------------------------- training curves

def _read_history(path: Path) -> dict[str, np.ndarray]:
    """history.csv as float columns (empty cell -> NaN); a HistomilError for anything unusable."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            raw = list(reader)
    except FileNotFoundError:
        raise HistomilError(f"{path}: training history not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise HistomilError(f"{path}: cannot read training history: {e}") from None
    for need in ("epoch", "train_loss"):
        if need not in fields:
            raise HistomilError(f"{path}: missing column '{need}' (found: {', '.join(fields) or 'none'})")
    if not raw:
        raise HistomilError(f"{path}: no epochs recorded")
    cols: dict[str, list[float]] = {c: [] for c in fields if c}
    for line_no, row in enumerate(raw, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        for c in cols:
            text = (row.get(c) or "").strip()
            if text.lower() in ("", "nan", "none", "null"):
                cols[c].append(math.nan)
                continue
            try:
                cols[c].append(float(text))
            except ValueError:
                raise HistomilError(f"{path}: line {line_no}, column '{c}': not a number: {text!r}") from None
    out = {c: np.asarray(v, dtype=np.float64) for c, v in cols.items()}
    if not np.all(np.isfinite(out["epoch"])):
        raise HistomilError(f"{path}: column 'epoch' has empty or non-numeric cells")
    return out


def plot_training_curves(history_csv: str | Path, out_png: str | Path, best_epoch: int | None = None) -> Path:
    """Loss (train/val) and accuracy/AUC per epoch from ``history.csv``, side by side.

    Columns ``epoch`` and ``train_loss`` are required; ``train_acc``, ``val_loss``, ``val_acc`` and
    ``val_auc`` are drawn when they hold any number. The best epoch is marked when ``best_epoch`` is
    given, else at the last row whose ``best`` column is 1.
    """
    path = Path(history_csv)
    h = _read_history(path)
    epoch = h["epoch"]
    if best_epoch is None and "best" in h and np.any(h["best"] == 1):
        best_epoch = int(epoch[np.flatnonzero(h["best"] == 1)[-1]])

    fig = new_figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    panels = (
        (ax_loss, "loss", (("train_loss", "train loss", "C0"), ("val_loss", "val loss", "C1"))),
        (ax_acc, "accuracy / AUC", (("train_acc", "train acc", "C0"), ("val_acc", "val acc", "C1"),
                                    ("val_auc", "val AUC", "C2"))),
    )
    for ax, ylabel, series in panels:
        for col, label, color in series:
            if col in h and np.any(np.isfinite(h[col])):
                ok = np.isfinite(h[col])
                ax.plot(epoch[ok], h[col][ok], marker="o", markersize=3, color=color, label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy and AUC")
    fig.suptitle(f"training curves ({path.parent.name or path.name})", fontsize=10)
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------- confusion matrix

def confusion_cells(m: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """Row-normalised fractions and the cell texts (count, then row percentage) of a confusion matrix.

    A row without samples (a class absent from the test set) reads ``n/a`` instead of a percentage.
    """
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros(m.shape, dtype=np.float64), where=rows > 0)
    texts = [
        [f"{m[i, j]}\n({100 * frac[i, j]:.1f}%)" if rows[i, 0] else f"{m[i, j]}\n(n/a)" for j in range(m.shape[1])]
        for i in range(m.shape[0])
    ]
    return frac, texts


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    out_png: str | Path,
    title: str,
    class_names: Sequence[str] = ("negative", "positive"),
) -> Path:
    """A confusion matrix (rows = truth, columns = prediction) with counts and row percentages.

    Colour is the row-normalised fraction, so a small class is as readable as a large one.
    """
    m = np.asarray(cm)
    k = len(class_names)
    if m.shape != (k, k) or m.dtype.kind not in "iuf" or np.any(m < 0) or np.any(m != np.round(m)):
        raise HistomilError(
            f"plot_confusion_matrix ({out_png}): expected a {k}x{k} matrix of non-negative counts, got {m.tolist()}"
        )
    frac, texts = confusion_cells(m.astype(np.int64))
    fig = new_figure(1.6 * k + 2.2, 1.4 * k + 1.6)
    ax = fig.subplots()
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=11,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), [str(c) for c in class_names])
    ax.set_yticks(range(k), [str(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------- ROC and PR

def plot_roc_pr(
    curves: Mapping[str, tuple[Any, Any]], out_png: str | Path, title: str | None = None
) -> Path:
    """ROC (left) and precision-recall (right) curves of several test sets on one figure.

    ``curves`` maps a test-set name to ``(y_true, prob)``. A set with a single class has no curve;
    it is listed in the legend as such. Dotted lines are chance: the diagonal for ROC, the positive
    prevalence of each set for PR.
    """
    if not curves:
        raise ValueError("plot_roc_pr: no test sets given")
    fig = new_figure(11, 4.6)
    ax_roc, ax_pr = fig.subplots(1, 2)
    ax_roc.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    for i, (name, (y_true, prob)) in enumerate(curves.items()):
        y, p = check_binary_inputs(y_true, prob, f"plot_roc_pr: {name}")
        color = f"C{i % 10}"
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            only = "positive" if n_pos else "negative"
            for ax in (ax_roc, ax_pr):
                ax.plot([], [], color=color, label=f"{name} (n={y.size}, all {only}: no curve)")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax_roc.plot(fpr, tpr, color=color, label=f"{name} (AUC {roc_auc_score(y, p):.3f}, n={y.size})")
        precision, recall, _ = precision_recall_curve(y, p)
        ax_pr.plot(recall, precision, color=color, drawstyle="steps-post",
                   label=f"{name} (AP {average_precision_score(y, p):.3f}, n={y.size})")
        ax_pr.axhline(n_pos / y.size, color=color, linestyle=":", linewidth=1)
    for ax, (xl, yl, t) in ((ax_roc, ("false positive rate", "true positive rate", "ROC")),
                            (ax_pr, ("recall", "precision", "precision-recall"))):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png)

"""One self-contained HTML report of a finished run: metrics with intervals, curves, tile galleries.

Two kinds of run folder are understood:

* a study run (``histomil run`` / ``histomil demo``): ``evaluation/metrics.json`` and
  ``predictions_<set>.csv``, ``model/model.pt`` and ``history.csv``, ``features/<set>/*.h5`` and
  ``bags/<set>/tiles.csv``. Bootstrap 95% intervals (bags resampled) and the calibration error are
  computed here from the predictions;
* a cross-validation (``histomil crossval``): ``crossval.json`` and ``seed_<s>/fold_<f>/`` folders.
  The table is the one of ``crossval.json`` (mean ± std over runs [95% interval of the mean]);
  training and ROC curves are drawn per run, ROC / PR and reliability on the pooled predictions.

For a few bags (the most confident correct ones, the most wrong ones, and any the user names) the
report shows the bag's tiles sorted by attention, each with its attention score and, where the
study knows it, the tile's true label (tumour tiles get a red border). Attention comes from running
the saved model on the bag's features: the feature file when it was kept, otherwise the features
are looked up in the run's tile cache by the hash of each tile file.

The HTML needs nothing but itself to open: figures are inlined as base64 PNG, thumbnails as base64
JPEG (~96 px), CSS is inline and there is no script. Every figure is also written as a PNG to
``<report name>_figures/`` beside the HTML. All files are written atomically.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import METRICS, bootstrap_ci
from histomil.evaluation.calibration import expected_calibration_error, plot_reliability
from histomil.reports.plots import (
    figure_png,
    new_figure,
    plot_confusion_matrix,
    plot_roc_pr,
    plot_training_curves,
)
from histomil.reports.tables import write_bytes, write_text
from histomil.reports.task_report import build_task_report, task_metrics_file

Log = Callable[[str], None]

THUMB_PX = 96  # longest side of a gallery thumbnail
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
# What the report is made of
# --------------------------------------------------------------------------------------------


@dataclass
class BagRef:
    """One evaluated bag: where it came from, its prediction and where its tiles and features live."""

    run: str  # "" for a study run, "seed_0/fold_1" in a cross-validation
    set_name: str
    bag_id: str
    y: int
    p: float
    threshold: float
    model_path: Path
    feature_file: Path | None  # <bag_id>.h5, when it exists
    bag_dir: Path | None  # the bag's tile folder, when it exists
    truth_csv: Path | None  # tiles.csv of the bag's set, when it exists
    cache_dir: Path | None = None  # tile feature cache (cross-validation)
    reason: str = ""

    @property
    def name(self) -> str:
        return "/".join(x for x in (self.run, self.set_name, self.bag_id) if x)

    @property
    def correct(self) -> bool:
        return int(self.p >= self.threshold) == self.y


@dataclass
class Tile:
    name: str
    attention: float
    truth: int | None
    thumb: str | None  # data URI, None when the image could not be read


@dataclass
class Gallery:
    bag: BagRef
    tiles: list[Tile] = field(default_factory=list)
    n_tiles: int = 0
    prob: float | None = None  # P(tumour) the saved model gives now (should equal the predictions file)
    note: str = ""


@dataclass
class Figure:
    key: str  # file stem
    title: str
    png: bytes
    caption: str = ""
    size: str = "wide"  # display width class: wide (as drawn, up to the page), medium, small


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


def _fmt(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{f:.{digits}f}" if math.isfinite(f) else "n/a"


def _num_attr(v: Any) -> str:
    """A number for a data-value attribute: repr of the float, or empty for n/a."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return ""
    return repr(f) if math.isfinite(f) else ""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _thumbnail(path: Path, size: int = THUMB_PX) -> str | None:
    """A JPEG data URI of the image scaled to fit ``size`` px, or None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, much faster
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=75, optimize=True)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return _data_uri(buf.getvalue(), "image/jpeg")


# --------------------------------------------------------------------------------------------
# Figures drawn here (the others come from reports.plots and evaluation.calibration)
# --------------------------------------------------------------------------------------------


def plot_runs_training(histories: Mapping[str, dict[str, np.ndarray]], best: Mapping[str, int | None]) -> bytes:
    """Training curves of several runs on one figure: losses (left) and validation AUC (right)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11, 4.2)
    ax_loss, ax_auc = fig.subplots(1, 2)
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i % 10}"
        ep = h["epoch"]
        if "train_loss" in h:
            ax_loss.plot(ep, h["train_loss"], color=color, linewidth=1.2, label=f"{name} train")
        if "val_loss" in h and np.any(np.isfinite(h["val_loss"])):
            ax_loss.plot(ep, h["val_loss"], color=color, linewidth=1.2, linestyle="--", label=f"{name} val")
        if "val_auc" in h and np.any(np.isfinite(h["val_auc"])):
            ax_auc.plot(ep, h["val_auc"], color=color, marker="o", markersize=2.5, linewidth=1.2, label=name)
            b = best.get(name)
            if b is not None and np.any(ep == b):
                ax_auc.plot([b], [h["val_auc"][ep == b][0]], marker="*", markersize=11, color=color)
    for ax, yl, t in ((ax_loss, "loss", "loss (solid: train, dashed: validation)"),
                      (ax_auc, "validation ROC-AUC", "validation AUC (star: best epoch)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(yl)
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
    ax_auc.set_ylim(-0.02, 1.02)
    if len(histories) <= 12:
        ax_auc.legend(fontsize=7, loc="lower right")
    return figure_png(fig)


def plot_runs_roc(per_set: Mapping[str, Sequence[tuple[str, np.ndarray, np.ndarray]]]) -> bytes:
    """One ROC panel per test set with one thin line per run (its own predictions)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    names = list(per_set)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = new_figure(3.2 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        aucs = []
        for i, (run, y, p) in enumerate(per_set[name]):
            if 0 < y.sum() < y.size:
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, color=f"C{i % 10}", linewidth=1, alpha=0.8)
                aucs.append(roc_auc_score(y, p))
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        label = f"AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" if len(aucs) > 1 else ""
        ax.set_title(f"{name}\n{len(per_set[name])} runs {label}", fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return figure_png(fig)


def _file_figure(key: str, title: str, draw: Callable[[Path], Any], fig_dir: Path, caption: str = "",
                 size: str = "wide") -> Figure:
    """Run a plotting function that writes ``fig_dir/<key>.png`` and keep its bytes for inlining."""
    path = fig_dir / f"{key}.png"
    draw(path)
    return Figure(key, title, path.read_bytes(), caption, size)


# --------------------------------------------------------------------------------------------
# Choosing bags and building galleries
# --------------------------------------------------------------------------------------------


def choose_bags(candidates: Sequence[BagRef], named: Sequence[str], max_bags: int) -> list[BagRef]:
    """The bags to show: the named ones, then the most confident correct and the most wrong ones.

    ``named`` entries are matched against :attr:`BagRef.name` (``SET/BAG`` for a study run,
    ``seed_S/fold_F/SET/BAG`` in a cross-validation) or, as a short form, its last two parts
    (``SET/BAG``: the first run holding it) or a bare ``BAG`` (the first test set holding it).
    Of the ``max_bags`` chosen automatically, half (rounded up) are the most confident correctly
    classified bags, alternating tumour and non-tumour bags, and the rest the most confidently
    misclassified ones (more confident ones when fewer are wrong). Ties keep the input order.
    """
    chosen: list[BagRef] = []
    seen: set[str] = set()

    def take(b: BagRef, reason: str) -> None:
        if b.name not in seen:
            seen.add(b.name)
            chosen.append(BagRef(**{**b.__dict__, "reason": reason}))

    for want in named:
        w = want.strip().strip("/")
        hit = next((b for b in candidates if b.name == w), None)
        hit = hit or next((b for b in candidates if f"{b.set_name}/{b.bag_id}" == w), None)
        hit = hit or next((b for b in candidates if b.bag_id == w), None)
        if hit is None:
            sets = ", ".join(dict.fromkeys(b.set_name for b in candidates))
            raise HistomilError(f"--bag {want!r}: no such bag among the evaluated bags (give SET/BAG; test sets: {sets})")
        take(hit, "named")
    if max_bags <= 0:
        return chosen

    def conf(b: BagRef) -> float:
        return b.p if b.y == 1 else 1.0 - b.p

    order = {id(b): i for i, b in enumerate(candidates)}
    correct = sorted((b for b in candidates if b.correct), key=lambda b: (-conf(b), order[id(b)]))
    wrong = sorted((b for b in candidates if not b.correct), key=lambda b: (conf(b), order[id(b)]))
    pos = [b for b in correct if b.y == 1]
    neg = [b for b in correct if b.y == 0]
    confident: list[BagRef] = []
    for i in range(max(len(pos), len(neg))):
        confident += [x[i] for x in (pos, neg) if i < len(x)]
    n_wrong = min(len(wrong), max_bags // 2)
    n_conf = max_bags - n_wrong
    for b in confident[:n_conf]:
        take(b, "most confident (correct)")
    for b in wrong[:n_wrong]:
        take(b, "most wrong")
    return chosen


def _resolve_tile(path: str, bag_dir: Path | None) -> Path | None:
    p = Path(path)
    for cand in (p, bag_dir / p.name if bag_dir is not None else None):
        if cand is not None and cand.is_file():
            return cand
    return None


def _truth_map(truth_csv: Path | None, bag_id: str) -> dict[str, int]:
    """Tile file name -> tile label for one bag, from a ``tiles.csv`` (empty when unknown)."""
    if truth_csv is None or not truth_csv.is_file():
        return {}
    out: dict[str, int] = {}
    try:
        with open(truth_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if str(row.get("case", row.get("bag_id"))) == bag_id and (row.get("tile_label") or "") != "":
                    out[Path(row["path"]).name] = int(float(row["tile_label"]))
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise HistomilError(f"{truth_csv}: unreadable tile labels ({exc})") from None
    return out


def _features_from_cache(bag: BagRef, encoder_name: str | None) -> tuple[np.ndarray, list[str]] | str:
    """The bag's features looked up in the tile cache by tile hash, or why that is not possible."""
    from histomil.data.bags import load_bag_folders
    from histomil.features.cache import FeatureCache
    from histomil.features.extract import tile_digests

    if bag.bag_dir is None or not bag.bag_dir.is_dir():
        return "its feature file and its tile folder were both removed (keep_intermediate / prune_bags)"
    if bag.cache_dir is None or not bag.cache_dir.is_dir():
        return "its feature file was removed and there is no tile cache"
    try:
        found = [b for b in load_bag_folders(bag.bag_dir.parent, require_labels=False) if b.bag_id == bag.bag_id]
        if not found:
            return f"no tiles in {bag.bag_dir}"
        paths = [str(p) for p in found[0].tile_paths]
        digests = tile_digests([Path(p) for p in paths])
        for meta in sorted(bag.cache_dir.glob("*/encoder.json")):
            info = json.loads(meta.read_text(encoding="utf-8"))
            if encoder_name and info.get("name") not in (None, encoder_name):
                continue
            cache = FeatureCache(bag.cache_dir, info)
            keys = [digests[p] for p in paths]
            if all(k in cache for k in keys):
                return cache.get_many(keys), paths
    except (HistomilError, OSError, ValueError, json.JSONDecodeError) as exc:
        return f"the tile cache could not be read ({exc})"
    return "its tiles are not in the tile cache"


class _Models:
    """Loaded checkpoints, one per model path."""

    def __init__(self) -> None:
        self._models: dict[Path, tuple[Any, dict]] = {}

    def get(self, path: Path) -> tuple[Any, dict]:
        if path not in self._models:
            from histomil.training.checkpoint import load_checkpoint

            self._models[path] = load_checkpoint(path)
        return self._models[path]


def build_gallery(bag: BagRef, models: _Models, max_tiles: int = 40) -> Gallery:
    """Tiles of one bag sorted by the model's attention (highest first), with thumbnails and truth."""
    from histomil.features.formats import load_any_features
    from histomil.features.validate import check_feature_bag, model_inputs
    from histomil.training.common import torch_threads
    from histomil.training.trainer import predict

    gal = Gallery(bag)
    if not bag.model_path.is_file():
        gal.note = f"no gallery: model {bag.model_path} not found"
        return gal
    model, meta = models.get(bag.model_path)
    if meta.get("kind", "features") != "features":
        gal.note = f"no gallery: {bag.model_path} is an end-to-end ({meta.get('kind')}) model, not one on tile features"
        return gal
    if bag.feature_file is not None and bag.feature_file.is_file():
        fb = load_any_features(bag.feature_file)
        want = model_inputs(meta)
        check_feature_bag(fb, dim=want.dim, encoder=want.encoder)
        feats, paths = fb.features, fb.tile_paths
    else:
        got = _features_from_cache(bag, (meta.get("encoder_info") or {}).get("name"))
        if isinstance(got, str):
            gal.note = f"no gallery: {got}"
            return gal
        feats, paths = got
    with torch_threads(1):
        (probs, att), = predict(model, [feats])
    att = np.asarray(att, dtype=np.float64)
    gal.n_tiles = len(paths)
    gal.prob = float(probs[1]) if len(probs) > 1 else None
    notes = []
    if gal.prob is not None and abs(gal.prob - bag.p) > 1e-3:
        notes.append(f"the model now gives P(tumour) = {gal.prob:.4f} on these features, the predictions file"
                     f" {bag.p:.4f}: features or model changed since the evaluation")
    if not np.all(np.isfinite(att)):
        gal.note = f"no gallery: model {meta.get('model_name', '?')!r} gives no tile attention"
        return gal
    truth = _truth_map(bag.truth_csv, bag.bag_id)
    order = np.argsort(-att, kind="stable")[: max(1, max_tiles)]
    missing = 0
    for i in order:
        path = paths[int(i)]
        f = _resolve_tile(path, bag.bag_dir)
        thumb = _thumbnail(f) if f is not None else None
        missing += thumb is None
        name = Path(path).name
        gal.tiles.append(Tile(name, float(att[i]), truth.get(name), thumb))
    if missing:
        notes.append(f"{missing} tile image(s) could not be found or read")
    gal.note = "; ".join(notes)
    return gal


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:18px 26px 60px;background:#fff}
h1{font-size:1.55em;margin:.3em 0 .1em}h2{font-size:1.22em;margin:1.6em 0 .5em;border-bottom:2px solid #e3e6ea;padding-bottom:.2em}
h3{font-size:1.02em;margin:1.1em 0 .3em}.meta{color:#57606a;font-size:.9em;margin:.2em 0}
p.note{color:#57606a;font-size:.88em;margin:.3em 0 .8em}
table{border-collapse:collapse;font-size:.86em;margin:.4em 0 1em}
th,td{border:1px solid #d0d7de;padding:4px 7px;text-align:right;vertical-align:top;white-space:nowrap}
.scroll{overflow-x:auto}
th{background:#f0f3f6;text-align:center;white-space:normal}td.name{text-align:left;font-weight:600;white-space:nowrap}
td .ci{display:block;color:#57606a;font-size:.86em;white-space:nowrap}
nav a{margin-right:1em;color:#0b57d0;text-decoration:none;font-size:.9em}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.fig{margin:0}.fig img{max-width:100%;border:1px solid #e3e6ea}
.fig.small img{width:270px}.fig.medium img{width:460px}.fig.small{max-width:272px}.fig.medium{max-width:462px}
.fig figcaption{font-size:.82em;color:#57606a;max-width:1100px}
.gallery{border:1px solid #d0d7de;border-radius:6px;padding:6px 12px 12px;margin:14px 0}
.gallery h3{margin-top:.4em}.tiles{display:flex;flex-wrap:wrap;gap:6px}
.tile{margin:0;width:102px;font-size:11px;text-align:center}
.tile img,.tile .noimg{width:96px;height:96px;object-fit:cover;border:3px solid #c9ced4;border-radius:3px;display:block}
.tile.tumour img,.tile.tumour .noimg{border-color:#d62728}
.tile .noimg{background:#eee;color:#888;font-size:10px;line-height:96px}
.bar{height:4px;background:#e3e6ea;margin:2px 0}.bar span{display:block;height:4px;background:#1f77b4}
.lab{color:#57606a}.tumour .lab{color:#d62728;font-weight:600}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:.8em;background:#eef;margin-left:6px}
.badge.wrong{background:#fde2e1}.badge.right{background:#e1f5e6}
.legend{font-size:.85em;color:#57606a}.legend .sw{display:inline-block;width:12px;height:12px;border:3px solid #d62728;vertical-align:middle;margin:0 3px 0 8px}
.legend .sw.n{border-color:#c9ced4}
"""


def _figure_html(fig: Figure, rel_dir: str) -> str:
    cap = f"<figcaption>{_esc(fig.caption)} (also <code>{_esc(rel_dir)}/{_esc(fig.key)}.png</code>)</figcaption>"
    return (
        f'<figure class="fig {_esc(fig.size)}" id="fig-{_esc(fig.key)}"><img alt="{_esc(fig.title)}" '
        f'src="{_data_uri(fig.png, "image/png")}">{cap}</figure>'
    )


def _metric_cell(set_name: str, metric: str, value: Any, low: Any = None, high: Any = None, std: Any = None) -> str:
    text = _fmt(value) + (f" ± {_fmt(std)}" if std is not None else "")
    ci = f'<span class="ci">[{_fmt(low)}, {_fmt(high)}]</span>' if low is not None or high is not None else ""
    return (
        f'<td data-set="{_esc(set_name)}" data-metric="{_esc(metric)}" data-value="{_num_attr(value)}"'
        f' data-low="{_num_attr(low)}" data-high="{_num_attr(high)}">{text}{ci}</td>'
    )


def _gallery_html(g: Gallery, index: int) -> str:
    b = g.bag
    pred = int(b.p >= b.threshold)
    verdict = "right" if pred == b.y else "wrong"
    lab = {1: "tumour", 0: "non-tumour"}
    n_tum = sum(1 for t in g.tiles if t.truth == 1)
    known = sum(1 for t in g.tiles if t.truth is not None)
    head = (
        f'<h3>{_esc(b.name)}<span class="badge">{_esc(b.reason)}</span>'
        f'<span class="badge {verdict}">{"correct" if verdict == "right" else "misclassified"}</span></h3>'
        f'<p class="meta">true bag label: <b>{lab[b.y]}</b>; P(tumour) = <b>{b.p:.3f}</b>, threshold {b.threshold:.3f}'
        f" &rarr; predicted {lab[pred]}."
    )
    if g.tiles:
        shown = "all" if len(g.tiles) == g.n_tiles else f"the top {len(g.tiles)} of"
        head += f" Showing {shown} {g.n_tiles} tiles, highest attention first"
        head += f"; {n_tum} of them tumour by tile truth." if known else "; tile truth unknown."
    head += "</p>"
    if g.note:
        head += f'<p class="note">{_esc(g.note)}</p>'
    top = max((t.attention for t in g.tiles), default=1.0) or 1.0
    cells = []
    for rank, t in enumerate(g.tiles, start=1):
        cls = "tile tumour" if t.truth == 1 else "tile"
        truth_text = lab.get(t.truth, "label unknown") if t.truth is not None else "label unknown"
        img = (
            f'<img alt="{_esc(t.name)}" title="{_esc(t.name)}" src="{t.thumb}">' if t.thumb
            else '<div class="noimg">no image</div>'
        )
        width = max(0.0, min(100.0, 100.0 * t.attention / top))
        cells.append(
            f'<figure class="{cls}" data-rank="{rank}" data-attention="{t.attention!r}" '
            f'data-truth="{"" if t.truth is None else t.truth}">{img}'
            f'<div class="bar"><span style="width:{width:.0f}%"></span></div>'
            f'<figcaption>#{rank} att {t.attention:.3g}<br><span class="lab">{truth_text}</span></figcaption></figure>'
        )
    return (
        f'<section class="gallery" id="bag-{index}" data-bag="{_esc(b.name)}" data-reason="{_esc(b.reason)}"'
        f' data-y="{b.y}" data-prob="{b.p!r}" data-model-prob="{_num_attr(g.prob)}">'
        f'{head}<div class="tiles">{"".join(cells)}</div></section>'
    )


def _page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    links = "".join(f'<a href="#{_esc(a)}">{_esc(t)}</a>' for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{_esc(title)}</h1><p class=\"meta\">{subtitle}</p><nav>{links}</nav>"
        + "".join(sections)
        + "</main></body></html>\n"
    )


def _gallery_section(galleries: Sequence[Gallery]) -> str:
    intro = (
        '<h2 id="galleries">Tile galleries</h2><p class="note">Each bag\'s tiles sorted by the model\'s attention'
        " (highest first); the bar is the attention relative to the bag's top tile."
        ' <span class="legend"><span class="sw"></span>tumour tile (tile truth)'
        '<span class="sw n"></span>non-tumour or unknown</span></p>'
    )
    if not galleries:
        return intro + '<p class="note">No bags to show.</p>'
    return intro + "".join(_gallery_html(g, i) for i, g in enumerate(galleries))


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
    head = "<tr><th>test set</th><th>bags (pos)</th>" + "".join(f"<th>{_esc(METRIC_TITLES[m])}</th>" for m in METRICS)
    head += "<th>ECE</th></tr>"
    rows = []
    for name, m in results.items():
        cells = [f'<td class="name">{_esc(name)}</td><td>{int(m.get("n", 0))} ({int(m.get("n_pos", 0))})</td>']
        for k in METRICS:
            ci = cis[name].get(k, {})
            cells.append(_metric_cell(name, k, m.get(k), ci.get("low"), ci.get("high")) if ci else _metric_cell(name, k, m.get(k)))
        cells.append(_metric_cell(name, "ece", eces[name]))
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
        h = "<tr><th>test set</th><th>positive bags</th>" + "".join(f"<th>{_esc(METRIC_TITLES[k])}</th>" for k in ATTENTION_KEYS) + "</tr>"
        r = "".join(
            f'<tr><td class="name">{_esc(n)}</td><td>{int(a.get("n_pos_bags", 0))}</td>'
            + "".join(_metric_cell(n, k, a.get(k)) for k in ATTENTION_KEYS) + "</tr>"
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
        figs.append(_file_figure(
            "training_curves", "training curves",
            lambda p: plot_training_curves(history, p, best_epoch=meta.get("best_epoch")), fig_dir,
            "Training curves: loss and accuracy / validation AUC per epoch; dashed line at the best epoch (the saved model).",
        ))
    curves = {n: (v[1], v[2]) for n, v in preds.items()}
    figs.append(_file_figure("roc_pr", "ROC and PR curves", lambda p: plot_roc_pr(curves, p), fig_dir,
                             "ROC (left) and precision-recall (right) per test set; dotted: chance."))
    for n, m in results.items():
        if "confusion_matrix" in m:
            figs.append(_file_figure(
                f"confusion_{n}", f"confusion matrix {n}",
                lambda p, n=n, m=m: plot_confusion_matrix(m["confusion_matrix"], p, title=n), fig_dir,
                f"{n}: rows truth, columns prediction; colour: row fraction.", "small",
            ))
    figs.append(_file_figure("reliability", "reliability diagram", lambda p: plot_reliability(curves, p, 10), fig_dir,
                             "Reliability diagram (10 equal-width bins) with each test set's ECE; bottom: bags per bin.", "medium"))

    # --- galleries
    models = _Models()
    galleries = [build_gallery(b, models, max_tiles) for b in chosen]
    log(f"tile galleries: {len(galleries)} bags")

    # --- header
    st = cfg.get("study", {}) if isinstance(cfg, dict) else {}
    tr = cfg.get("train", {}) if isinstance(cfg, dict) else {}
    fe = cfg.get("features", {}) if isinstance(cfg, dict) else {}
    facts = [
        f"model <b>{_esc(meta.get('model_name') or tr.get('model', '?'))}</b>",
        f"encoder <b>{_esc((meta.get('encoder_info') or {}).get('name') or fe.get('encoder', '?'))}</b>",
    ]
    if st:
        facts.append(f"bags of {st.get('bag_size', '?')} tiles: {st.get('train_bags', '?')} train /"
                     f" {st.get('val_bags', '?')} validation / {st.get('test_bags', '?')} per test set")
    if meta.get("best_epoch") is not None:
        facts.append(f"best epoch {meta['best_epoch']}")
    if timings:
        facts.append("wall time " + ", ".join(f"{_esc(k)} {float(v):.0f} s" for k, v in timings.items()))
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
    head += "".join(f"<th>{_esc(METRIC_TITLES[m])}</th>" for m in METRICS) + "<th>ECE</th><th>ECE pooled</th></tr>"
    rows = []
    for name, s in sets.items():
        cells = [
            f'<td class="name">{_esc(name)}</td><td>{int(s.get("n_runs", 0))}</td>',
            f'<td>{int(s.get("n_bags_pooled", 0))} ({int(s.get("n_pos_pooled", 0))})</td>',
        ]
        for m in METRICS:
            c = s["metrics"].get(m, {})
            cells.append(_metric_cell(name, m, c.get("mean"), c.get("low") if "low" in c else None,
                                      c.get("high") if "high" in c else None, std=c.get("std")))
        e = s.get("ece", {})
        cells.append(_metric_cell(name, "ece", e.get("mean"), std=e.get("std")))
        cells.append(_metric_cell(name, "ece_pooled", e.get("pooled")))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<div class="scroll"><table class="metrics" id="metrics-table">{head}{"".join(rows)}</table></div>'
    n_boot = int(summary.get("bootstrap_resamples", 0))
    sec = [
        f'<p class="meta">{summary.get("folds")} patient-grouped folds &times; {len(summary.get("seeds", []))} seed(s)'
        f' = {summary.get("n_runs")} runs; {summary.get("n_patients", "?")} patients'
        + (f", {summary['n_holdout_patients']} held out" if summary.get("n_holdout_patients") else "")
        + f"; threshold: {_esc(th.get('description', '?'))} (per run {_fmt(th.get('mean'))} ± {_fmt(th.get('std'))})."
        + (f" Total wall time {float(summary['wall_seconds']):.0f} s." if summary.get("wall_seconds") else "")
        + "</p>",
        f'<h2 id="metrics">{unit.capitalize()}-level metrics</h2><p class="note">Cells: mean ± standard deviation over runs'
        + (f" [95% bootstrap interval of the mean: {units} resampled within each run, {n_boot} resamples]" if n_boot else "")
        + ". ECE: expected calibration error per run (mean ± std) and of all runs' predictions pooled.</p>"
        + table,
    ]
    att_sets = [(n, s["attention"]) for n, s in sets.items() if s.get("attention")]
    if att_sets:
        h = "<tr><th>test set</th>" + "".join(f"<th>{_esc(METRIC_TITLES[k])}</th>" for k in ATTENTION_KEYS) + "</tr>"
        r = "".join(
            f'<tr><td class="name">{_esc(n)}</td>'
            + "".join(_metric_cell(n, k, a.get(k, {}).get("mean"), std=a.get(k, {}).get("std")) for k in ATTENTION_KEYS)
            + "</tr>"
            for n, a in att_sets
        )
        sec.append('<h3 id="instance">Instance level: attention against tile truth (positive bags; mean ± std over runs)</h3>'
                   f'<table class="attention">{h}{r}</table>')
    # per-run table
    prow = "".join(
        f"<tr><td>{r['seed']}</td><td>{r['fold']}</td><td>{_fmt(r.get('threshold'))}</td><td>{r.get('best_epoch')}</td>"
        f"<td>{r.get('epochs_run')}</td><td>{_fmt(r.get('val_roc_auc'))}</td>"
        + "".join(f"<td>{_fmt((r.get('test') or {}).get(n, {}).get('roc_auc'))}</td>" for n in sets)
        + "</tr>"
        for r in runs
    )
    sec.append(
        '<h3 id="runs">Runs</h3><table class="runs"><tr><th>seed</th><th>fold</th><th>threshold</th><th>best epoch</th>'
        "<th>epochs</th><th>val ROC-AUC</th>" + "".join(f"<th>{_esc(n)} ROC-AUC</th>" for n in sets) + f"</tr>{prow}</table>"
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
    figs.append(_file_figure("roc_pr_pooled", "pooled ROC and PR", lambda p: plot_roc_pr(curves, p, title=f"pooled over {len(runs)} runs"),
                             fig_dir, "ROC and precision-recall of all runs' predictions pooled (scores of different models mixed)."))
    for n, cm in confusion.items():
        figs.append(_file_figure(
            f"confusion_{n}", f"confusion matrix {n}",
            lambda p, n=n, cm=cm: plot_confusion_matrix(cm, p, title=f"{n}, summed over runs"), fig_dir,
            f"{n}: counts summed over runs, each at its own validation threshold.", "small",
        ))
    bins = int(summary.get("calibration_bins", 10))
    figs.append(_file_figure("reliability", "reliability diagram", lambda p: plot_reliability(curves, p, bins), fig_dir,
                             f"Reliability diagram of the pooled predictions ({bins} bins), with the pooled ECE.", "medium"))
    for f in figs:
        if not (fig_dir / f"{f.key}.png").is_file():
            write_bytes(fig_dir / f"{f.key}.png", f.png)

    models = _Models()
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
            sections.append(f'<h2 id="{anchor}">{title}</h2><div class="figs">' + "".join(_figure_html(f, rel) for f in group) + "</div>")
    sections.append(_gallery_section(body["galleries"]))
    nav = [("metrics", "Metrics")] + [(a, t) for a, t, g in groups if g] + [("galleries", "Tile galleries")]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = f"histomil report of a {kind}: <code>{_esc(run)}</code>, made {when}"
    return _page(f"histomil report: {run.name}", subtitle, nav, sections)


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
    ``evaluation/``) gets the report of :mod:`histomil.reports.task_report`. ``task``: refuse a run of
    another task (a study run or cross-validation without a recorded task is a classification).

    ``bags`` names extra bags to show (see :func:`choose_bags`); ``max_bags`` bags are chosen
    automatically (half most confident, half most wrong), each showing at most ``max_tiles`` tiles.
    ``n_resamples`` bootstrap resamples give the intervals of a study run (a cross-validation's come
    from its crossval.json).
    """
    run = Path(run_dir)
    task_json = task_metrics_file(run) if run.is_dir() else None
    if task_json is not None:
        out_path = Path(out) if out is not None else run / "report.html"
        if out_path.suffix.lower() not in (".html", ".htm"):
            raise HistomilError(f"{out_path}: the report is an HTML file; give a name ending in .html")
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


__all__ = ["BagRef", "Gallery", "build_gallery", "build_report", "choose_bags", "read_predictions_csv", "run_kind"]

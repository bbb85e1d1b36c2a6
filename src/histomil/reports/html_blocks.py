"""The building blocks of the HTML report: what a page is made of and how each piece is drawn.

:mod:`histomil.reports.html` (study and cross-validation reports) and :mod:`histomil.reports.galleries`
(tile galleries) both use these, so they live here, apart from either: the records of a report
(:class:`BagRef`, :class:`Tile`, :class:`Gallery`, :class:`Figure`), formatting helpers, inline
thumbnails, the figures drawn for several runs at once, the CSS and the HTML of figures, metric
cells, galleries and the page. The page needs nothing but itself to open: figures are inlined as
base64 PNG, thumbnails as base64 JPEG (~96 px), CSS is inline and there is no script.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histomil.reports.plots import figure_png, new_figure

THUMB_PX = 96  # longest side of a gallery thumbnail


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
# Formatting
# --------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals, or "n/a" when it is not a finite number."""
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


def esc(text: Any) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def thumbnail(path: Path, size: int = THUMB_PX) -> str | None:
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


def file_figure(key: str, title: str, draw: Callable[[Path], Any], fig_dir: Path, caption: str = "",
                 size: str = "wide") -> Figure:
    """Run a plotting function that writes ``fig_dir/<key>.png`` and keep its bytes for inlining."""
    path = fig_dir / f"{key}.png"
    draw(path)
    return Figure(key, title, path.read_bytes(), caption, size)


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


def figure_html(fig: Figure, rel_dir: str) -> str:
    """A ``<figure>`` with the PNG inlined and a caption naming its copy in ``rel_dir``."""
    cap = f"<figcaption>{esc(fig.caption)} (also <code>{esc(rel_dir)}/{esc(fig.key)}.png</code>)</figcaption>"
    return (
        f'<figure class="fig {esc(fig.size)}" id="fig-{esc(fig.key)}"><img alt="{esc(fig.title)}" '
        f'src="{_data_uri(fig.png, "image/png")}">{cap}</figure>'
    )


def metric_cell(set_name: str, metric: str, value: Any, low: Any = None, high: Any = None, std: Any = None) -> str:
    """A table cell: value (± std) [interval], with the numbers also in data-* attributes."""
    text = fmt(value) + (f" ± {fmt(std)}" if std is not None else "")
    ci = f'<span class="ci">[{fmt(low)}, {fmt(high)}]</span>' if low is not None or high is not None else ""
    return (
        f'<td data-set="{esc(set_name)}" data-metric="{esc(metric)}" data-value="{_num_attr(value)}"'
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
        f'<h3>{esc(b.name)}<span class="badge">{esc(b.reason)}</span>'
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
        head += f'<p class="note">{esc(g.note)}</p>'
    top = max((t.attention for t in g.tiles), default=1.0) or 1.0
    cells = []
    for rank, t in enumerate(g.tiles, start=1):
        cls = "tile tumour" if t.truth == 1 else "tile"
        truth_text = lab.get(t.truth, "label unknown") if t.truth is not None else "label unknown"
        img = (
            f'<img alt="{esc(t.name)}" title="{esc(t.name)}" src="{t.thumb}">' if t.thumb
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
        f'<section class="gallery" id="bag-{index}" data-bag="{esc(b.name)}" data-reason="{esc(b.reason)}"'
        f' data-y="{b.y}" data-prob="{b.p!r}" data-model-prob="{_num_attr(g.prob)}">'
        f'{head}<div class="tiles">{"".join(cells)}</div></section>'
    )


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    """The whole HTML document: title, subtitle, navigation links and the sections, CSS inline."""
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><p class=\"meta\">{subtitle}</p><nav>{links}</nav>"
        + "".join(sections)
        + "</main></body></html>\n"
    )


def gallery_section(galleries: Sequence[Gallery]) -> str:
    """The "Tile galleries" section: a legend, then one gallery per bag."""
    intro = (
        '<h2 id="galleries">Tile galleries</h2><p class="note">Each bag\'s tiles sorted by the model\'s attention'
        " (highest first); the bar is the attention relative to the bag's top tile."
        ' <span class="legend"><span class="sw"></span>tumour tile (tile truth)'
        '<span class="sw n"></span>non-tumour or unknown</span></p>'
    )
    if not galleries:
        return intro + '<p class="note">No bags to show.</p>'
    return intro + "".join(_gallery_html(g, i) for i, g in enumerate(galleries))


__all__ = [
    "CSS", "THUMB_PX", "BagRef", "Figure", "Gallery", "Tile", "esc", "figure_html", "file_figure", "fmt",
    "gallery_section", "metric_cell", "page", "plot_runs_roc", "plot_runs_training", "thumbnail",
]

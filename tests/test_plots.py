"""Report figures: valid PNGs written atomically, no pyplot figures left open, clear errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from histomil.errors import HistomilError
from histomil.reports.plots import confusion_cells, plot_confusion_matrix, plot_roc_pr, plot_training_curves

HISTORY = (
    "epoch,train_loss,train_acc,val_loss,val_acc,val_auc,best\n"
    "1,0.70,0.50,0.69,0.50,0.60,1\n"
    "2,0.50,0.70,0.60,0.70,,0\n"
    "3,0.30,0.90,0.50,0.80,0.85,1\n"
    "4,0.20,0.95,0.55,0.75,0.80,0\n"
)


def _png(path: Path, min_w: int = 300, min_h: int = 200) -> np.ndarray:
    """Assert ``path`` is a real PNG of a sensible size, alone in its folder; return its pixels."""
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert min_w <= w <= 3000 and min_h <= h <= 3000
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # something is drawn, not a blank canvas
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert plt.get_fignums() == []
    return pixels


@pytest.fixture(autouse=True)
def _no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def test_training_curves(tmp_path: Path) -> None:
    csv = tmp_path / "history.csv"
    csv.write_text(HISTORY)
    out = plot_training_curves(csv, tmp_path / "out" / "curves.png")
    assert out == tmp_path / "out" / "curves.png"
    marked = _png(out, 800, 300)
    # the best-epoch marker comes from the 'best' column (last 1 -> epoch 3); the same epoch given
    # explicitly draws the same picture, another epoch a different one
    same = _png(plot_training_curves(csv, tmp_path / "same.png", best_epoch=3))
    other = _png(plot_training_curves(csv, tmp_path / "other.png", best_epoch=2))
    assert np.array_equal(marked, same)
    assert not np.array_equal(marked, other)


def test_training_curves_without_validation_or_best(tmp_path: Path) -> None:
    csv = tmp_path / "history.csv"
    csv.write_text("epoch,train_loss,train_acc,val_loss,val_acc,val_auc\n1,0.7,0.5,,,\n2,0.6,0.6,,,\n")
    train_only = _png(plot_training_curves(csv, tmp_path / "a.png"))
    csv.write_text("epoch,train_loss,train_acc,val_loss,val_acc,val_auc\n1,0.7,0.5,0.8,0.4,0.5\n2,0.6,0.6,0.7,0.5,0.6\n")
    with_val = _png(plot_training_curves(csv, tmp_path / "b.png"))
    assert not np.array_equal(train_only, with_val)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("epoch,val_loss\n1,0.5\n", "missing column 'train_loss'"),
        ("epoch,train_loss\n", "no epochs recorded"),
        ("epoch,train_loss\n1,0.5\n2,abc\n", "line 3, column 'train_loss': not a number: 'abc'"),
        ("epoch,train_loss\n,0.5\n", "column 'epoch' has empty"),
    ],
)
def test_training_curves_bad_history(tmp_path: Path, text: str, fragment: str) -> None:
    csv = tmp_path / "history.csv"
    csv.write_text(text)
    with pytest.raises(HistomilError) as e:
        plot_training_curves(csv, tmp_path / "c.png")
    msg = str(e.value)
    assert fragment in msg and str(csv) in msg and "\n" not in msg
    assert not (tmp_path / "c.png").exists()


def test_training_curves_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HistomilError, match="training history not found"):
        plot_training_curves(tmp_path / "nope.csv", tmp_path / "c.png")


def test_confusion_cells_text() -> None:
    frac, texts = confusion_cells(np.array([[10, 2], [3, 0]]))
    assert texts == [["10\n(83.3%)", "2\n(16.7%)"], ["3\n(100.0%)", "0\n(0.0%)"]]
    assert frac[0].sum() == pytest.approx(1.0) and frac[1].tolist() == [1.0, 0.0]
    # a class absent from the test set: no percentage to show
    _, texts = confusion_cells(np.array([[4, 1], [0, 0]]))
    assert texts[1] == ["0\n(n/a)", "0\n(n/a)"]


def test_confusion_matrix_png(tmp_path: Path) -> None:
    a = _png(plot_confusion_matrix([[10, 2], [3, 0]], tmp_path / "cm.png", "internal test"), 250, 200)
    b = _png(plot_confusion_matrix([[2, 10], [0, 3]], tmp_path / "cm2.png", "internal test"), 250, 200)
    assert not np.array_equal(a, b)
    _png(plot_confusion_matrix(np.zeros((3, 3), int), tmp_path / "cm3.png", "3 classes", ("a", "b", "c")))


@pytest.mark.parametrize("cm", [[[1, 2, 3], [4, 5, 6]], [[1, -1], [0, 2]], [[0.5, 1], [0, 2]]])
def test_confusion_matrix_bad(tmp_path: Path, cm) -> None:
    with pytest.raises(HistomilError, match="non-negative counts"):
        plot_confusion_matrix(cm, tmp_path / "cm.png", "t")
    assert not (tmp_path / "cm.png").exists()


def test_roc_pr(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.35 * y + 0.65 * rng.random(60), 0, 1)
    curves = {
        "internal": (y, p),
        "external": (y[:30], rng.random(30)),
        "all-positive": (np.ones(5, int), np.full(5, 0.7)),  # no curve, only a legend entry
    }
    _png(plot_roc_pr(curves, tmp_path / "rocpr.png", title="test sets"), 800, 300)


def test_roc_pr_bad_input(tmp_path: Path) -> None:
    with pytest.raises(HistomilError, match="external"):
        plot_roc_pr({"external": ([0, 1, 1], [0.2, 0.4])}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="no test sets"):
        plot_roc_pr({}, tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HistomilError, match="cannot write"):
        plot_confusion_matrix([[1, 0], [0, 1]], blocker / "cm.png", "t")

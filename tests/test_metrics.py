"""Metrics against hand-computed values, undefined cases, JSON safety and the Markdown table."""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from histomil.errors import HistomilError
from histomil.evaluation.metrics import attention_metrics, binary_metrics
from histomil.files import sanitize
from histomil.reports.tables import metrics_markdown
from histomil.files import write_json, write_text

# 5 bags: truth and positive-class probability. At threshold 0.5 the predictions are [0,1,0,1,1]:
# tn=1 (0.1), fp=1 (0.6), fn=1 (0.4), tp=2 (0.8, 0.9).
Y = np.array([0, 0, 1, 1, 1])
P = np.array([0.1, 0.6, 0.4, 0.8, 0.9])


def test_binary_metrics_hand_computed() -> None:
    m = binary_metrics(Y, P)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert (m["n"], m["n_pos"], m["n_neg"], m["threshold"]) == (5, 3, 2, 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # ROC-AUC: of the 3x2 (pos, neg) pairs only (0.4, 0.6) is mis-ordered -> 5/6.
    assert m["roc_auc"] == pytest.approx(5 / 6)
    # AP: ranked 0.9+ 0.8+ 0.6- 0.4+ 0.1-; precision at each positive 1, 1, 3/4, each worth 1/3.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 4) / 3)


def test_binary_metrics_are_plain_json_types() -> None:
    m = binary_metrics(Y, P)
    for key, value in m.items():
        if key == "confusion_matrix":
            assert all(type(v) is int for row in value for v in row)
        else:
            assert type(value) in (int, float), (key, type(value))
    json.dumps(m, allow_nan=False)


def test_auc_with_ties_counts_half() -> None:
    # pos 0.5 vs neg 0.5 is a tie (1/2); the other 3 pairs are ordered -> 3.5/4.
    m = binary_metrics([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])
    assert m["roc_auc"] == pytest.approx(0.875)


def test_threshold_changes_predictions() -> None:
    low = binary_metrics(Y, P, threshold=0.05)  # everything positive
    assert low["confusion_matrix"] == [[0, 2], [0, 3]]
    assert (low["precision"], low["recall"], low["specificity"]) == (pytest.approx(0.6), 1.0, 0.0)
    at = binary_metrics(Y, P, threshold=0.6)  # prob >= threshold counts as positive
    assert at["confusion_matrix"] == [[1, 1], [1, 2]]
    above = binary_metrics(Y, P, threshold=0.61)
    assert above["confusion_matrix"] == [[2, 0], [1, 2]]
    assert above["precision"] == 1.0 and above["specificity"] == 1.0
    # AUCs do not depend on the threshold
    assert low["roc_auc"] == above["roc_auc"] == pytest.approx(5 / 6)


def test_no_predicted_positives_gives_zero_precision_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics(Y, P, threshold=0.95)
    assert m["confusion_matrix"] == [[2, 0], [3, 0]]
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(0.4)


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_gives_nan_aucs_without_exception_or_warning(label: int) -> None:
    y = np.full(4, label)
    p = np.array([0.2, 0.7, 0.9, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics(y, p)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    if label == 1:  # all positive: 2 of 4 found, specificity undefined
        assert m["confusion_matrix"] == [[0, 0], [2, 2]]
        assert m["recall"] == 0.5 and math.isnan(m["specificity"])
        assert m["balanced_accuracy"] == 0.5
        assert m["precision"] == 1.0
    else:  # all negative: 2 of 4 correctly rejected, recall undefined
        assert m["confusion_matrix"] == [[2, 2], [0, 0]]
        assert m["specificity"] == 0.5 and math.isnan(m["recall"])
        assert m["balanced_accuracy"] == 0.5
        assert m["precision"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == 0.5


def test_labels_may_be_bool_or_float() -> None:
    a = binary_metrics(Y.astype(bool), P)
    b = binary_metrics(Y.astype(np.float32), P.astype(np.float32))
    assert a["confusion_matrix"] == b["confusion_matrix"] == [[1, 1], [1, 2]]
    assert b["roc_auc"] == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    "y, p, fragment",
    [
        ([0, 1, 1], [0.1, 0.2], "3 labels but 2 probabilities"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "must be 0 or 1"),
        ([0, 1], [0.1, 1.7], "must lie in [0, 1]"),
        ([0, 1], [-2.0, 3.0], "logits"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([], [], "no samples"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_bad_input_is_one_line_error(y, p, fragment: str) -> None:
    with pytest.raises(HistomilError) as e:
        binary_metrics(y, p)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_threshold() -> None:
    with pytest.raises(HistomilError, match="threshold"):
        binary_metrics(Y, P, threshold=float("nan"))


# ----------------------------------------------------------------------------- attention

def test_attention_perfect_and_reversed() -> None:
    tiles = [np.array([0, 1, 0, 1]), np.array([1, 0, 0])]
    perfect = [np.array([0.1, 0.4, 0.1, 0.4]), np.array([0.8, 0.1, 0.1])]
    reverse = [np.array([0.4, 0.1, 0.4, 0.1]), np.array([0.1, 0.45, 0.45])]
    # a negative bag with "bad" attention must not count
    neg_tiles, neg_att = np.array([0, 0]), np.array([0.9, 0.1])
    good = attention_metrics([1, 1, 0], perfect + [neg_att], tiles + [neg_tiles])
    assert good["tile_auc_pooled"] == 1.0 and good["tile_auc_mean"] == 1.0 and good["top1_hit"] == 1.0
    assert (good["n_bags"], good["n_pos_bags"], good["n_bags_auc"]) == (3, 2, 2)
    bad = attention_metrics([1, 1, 0], reverse + [neg_att], tiles + [neg_tiles])
    assert bad["tile_auc_pooled"] == 0.0 and bad["tile_auc_mean"] == 0.0 and bad["top1_hit"] == 0.0
    # random baseline: mean tumour fraction (2/4 and 1/3)
    assert good["top1_hit_random"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_attention_mixed_hand_computed() -> None:
    att = [np.array([0.1, 0.7, 0.2]), np.array([0.3, 0.3, 0.4])]
    tiles = [np.array([0, 1, 0]), np.array([1, 1, 0])]
    m = attention_metrics(np.array([1, 1]), att, tiles)
    # bag 0: AUC 1, top tile tumour; bag 1: AUC 0, top tile (0.4) normal
    assert m["tile_auc_mean"] == pytest.approx(0.5)
    assert m["top1_hit"] == pytest.approx(0.5)
    # pooled: tumour {0.7, 0.3, 0.3} vs normal {0.1, 0.2, 0.4}: 3 + 2 + 2 of 9 pairs ordered
    assert m["tile_auc_pooled"] == pytest.approx(7 / 9)


def test_attention_ties_skips_and_single_class_bags() -> None:
    att = [np.array([0.5, 0.5, 0.0]), np.array([0.2, 0.8]), np.array([0.6, 0.4]), np.array([0.3, 0.7])]
    tiles = [np.array([1, 0, 0]), np.array([1, 1]), None, np.array([1, 0])]
    m = attention_metrics([1, 1, 1, None], att, tiles)
    # bag 0: tie at the top between a tumour and a normal tile -> 0.5; bag 1: all tumour -> 1;
    # bag 2 has no tile truth and bag 3 no bag label: both skipped
    assert m["n_pos_bags"] == 2
    assert m["top1_hit"] == pytest.approx(0.75)
    assert m["n_bags_auc"] == 1  # an all-tumour bag has no within-bag AUC
    assert m["tile_auc_mean"] == pytest.approx(0.75)  # bag 0: 0.5 vs {0.5 tie, 0.0} -> 1.5/2


def test_attention_no_positive_bags_is_nan() -> None:
    m = attention_metrics([0, 0], [np.array([0.5, 0.5])] * 2, [np.array([0, 0])] * 2)
    assert m["n_pos_bags"] == 0 and m["n_bags_auc"] == 0
    assert all(math.isnan(m[k]) for k in ("tile_auc_pooled", "tile_auc_mean", "top1_hit", "top1_hit_random"))


def test_attention_bad_shapes() -> None:
    with pytest.raises(HistomilError, match="bag 0 has attention of shape"):
        attention_metrics([1], [np.array([0.5, 0.5])], [np.array([0, 1, 1])])
    with pytest.raises(HistomilError, match="must match"):
        attention_metrics([1, 0], [np.array([0.5, 0.5])], [np.array([0, 1])])
    with pytest.raises(HistomilError, match="must be 0 or 1"):
        attention_metrics([1], [np.array([0.5, 0.5])], [np.array([0, 3])])


# ----------------------------------------------------------------------------- JSON and tables

def test_sanitize() -> None:
    obj = {
        "a": float("nan"),
        "b": np.float32(0.25),
        "c": np.int64(3),
        "d": (np.array([1.0, np.inf]), [np.bool_(True)]),
        3: Path("/x/y.json"),
        "e": None,
    }
    assert sanitize(obj) == {"a": None, "b": 0.25, "c": 3, "d": [[1.0, None], [True]], "3": "/x/y.json", "e": None}
    assert type(sanitize(np.int64(3))) is int
    with pytest.raises(TypeError, match="object"):
        sanitize({"x": object()})


def test_metrics_markdown_exact_text() -> None:
    results = {
        "val": {"n": 4, "accuracy": 0.75, "roc_auc": float("nan"), "f1": 2 / 3},
        "test|x": {"n": 2, "accuracy": 1.0, "roc_auc": None},
    }
    text = metrics_markdown(results, columns=("n", "accuracy", "roc_auc", "f1"))
    assert text == (
        "| test set | n | accuracy | roc_auc | f1 |\n"
        "|---|---:|---:|---:|---:|\n"
        "| val | 4 | 0.750 | n/a | 0.667 |\n"
        "| test\\|x | 2 | 1.000 | n/a | n/a |\n"
    )


def test_metrics_markdown_default_columns_from_binary_metrics() -> None:
    text = metrics_markdown({"internal": binary_metrics(Y, P), "external": binary_metrics([1, 1], [0.9, 0.2])})
    lines = text.splitlines()
    assert lines[0] == "| test set | n | accuracy | roc_auc | pr_auc | precision | recall | f1 |"
    assert lines[2] == "| internal | 5 | 0.600 | 0.833 | 0.917 | 0.667 | 0.667 | 0.667 |"
    assert lines[3] == "| external | 2 | 0.500 | n/a | n/a | 1.000 | 0.500 | 0.667 |"


def test_write_json_atomic_and_sanitized(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "metrics.json"
    write_json(out, {"test": binary_metrics([1, 1], [0.9, 0.2])})
    data = json.loads(out.read_text())
    assert data["test"]["roc_auc"] is None and data["test"]["recall"] == 0.5
    assert out.read_text().startswith('{\n  "test": {\n    "n": 2,')
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]  # no temp file left
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    write_text(tmp_path / "t.md", "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"


def test_write_json_unserialisable_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_write_into_a_file_is_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HistomilError, match="cannot write") as e:
        write_json(blocker / "m.json", {"a": 1})
    assert str(blocker / "m.json") in str(e.value)

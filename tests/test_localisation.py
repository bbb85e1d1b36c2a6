"""Localisation scoring against known tumour tiles, on hand-made examples with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histomil.data.cohort import patient_bag
from histomil.errors import HistomilError
from histomil.evaluation.localisation import (
    SlideTruth,
    TileScores,
    attention_by_slide,
    geojson_scores,
    localise,
    read_truth,
    slide_localisation,
    summarise,
    tumour_labels,
)
from histomil.features.store import FeatureBag
from histomil.models.base import MILOutput
from histomil.slides.heatmap import tiles_geojson

# a 3 x 2 grid of 100-pixel tiles; tumour at (100, 0) and (200, 100)
TRUTH_CSV = "slide,x,y,size,is_tumour,content\n" + "\n".join(
    f"s1,{x},{y},100,{int((x, y) in {(100, 0), (200, 100)})},any" for y in (0, 100) for x in (0, 100, 200)
) + "\ns2,0,0,100,0,any\ns2,100,0,100,0,any\n"
COORDS = np.array([[0, 0], [100, 0], [200, 0], [0, 100], [100, 100], [200, 100]])


@pytest.fixture
def truth(tmp_path: Path) -> dict[str, SlideTruth]:
    (tmp_path / "truth.csv").write_text(TRUTH_CSV)
    return read_truth(tmp_path / "truth.csv")


def test_auc_and_top1_known_answers(truth) -> None:
    # tumour tiles score 0.9 and 0.3; the others 0.5, 0.1, 0.2, 0.4
    scores = np.array([0.5, 0.9, 0.1, 0.2, 0.4, 0.3])
    row = slide_localisation("s1", TileScores(COORDS, 100, scores), truth["s1"])
    # pairs (tumour, other): 0.9 beats all 4; 0.3 beats 0.1 and 0.2 -> 6 / 8
    assert row == {"slide": "s1", "n_tiles": 6, "n_tumour": 2, "auc": pytest.approx(0.75), "top1_hit": 1.0}
    miss = slide_localisation("s1", TileScores(COORDS, 100, -scores), truth["s1"])  # the order reversed
    assert miss["top1_hit"] == 0.0 and miss["auc"] == pytest.approx(0.25)
    tie = slide_localisation("s1", TileScores(COORDS, 100, np.array([1.0, 1.0, 0, 0, 0, 0.5])), truth["s1"])
    assert tie["top1_hit"] == pytest.approx(0.5)  # two tiles tied at the top, one of them tumour
    none = slide_localisation("s2", TileScores(COORDS[:2], 100, np.array([0.1, 0.2])), truth["s2"])
    assert none["auc"] is None and none["top1_hit"] is None
    summary = summarise([row, miss, none])
    assert summary["n_auc_slides"] == 2 and summary["auc_mean"] == pytest.approx(0.5)
    assert summary["auc_sd"] == pytest.approx(np.std([0.75, 0.25], ddof=1))
    assert summary["top1_hit_rate"] == pytest.approx(0.5) and summary["n_tumour_slides"] == 2


def test_tiles_on_another_grid_count_by_area(truth) -> None:
    # 50-pixel tiles: those inside a tumour tile are tumour, those half on one are too, others not
    coords = np.array([[100, 0], [150, 50], [75, 0], [60, 0], [250, 150], [0, 0]])
    assert tumour_labels(TileScores(coords, 50, np.zeros(6)), truth["s1"]).tolist() == [1, 1, 1, 0, 1, 0]


def test_geojson_round_trip_and_errors(truth, tmp_path: Path) -> None:
    scores = np.array([0.5, 0.9, 0.1, 0.2, 0.4, 0.3])
    heat = tmp_path / "heat"
    heat.mkdir()
    (heat / "s1_tiles.geojson").write_text(json.dumps(tiles_geojson(COORDS, 100, scores)))
    found = geojson_scores([tmp_path])
    assert list(found) == ["s1"] and found["s1"].size == 100
    assert np.array_equal(found["s1"].coords, COORDS) and np.allclose(found["s1"].scores, scores)
    rows, summary = localise(found, truth)
    assert rows[0]["auc"] == pytest.approx(0.75) and summary["top1_hit_rate"] == 1.0
    with pytest.raises(HistomilError, match="no truth rows: s9"):
        localise({"s9": found["s1"]}, truth)
    (heat / "bad_tiles.geojson").write_text("{}")
    with pytest.raises(HistomilError, match="bad_tiles.geojson: not a heatmap GeoJSON"):
        geojson_scores([heat])
    (tmp_path / "t.csv").write_text("slide,x,y\ns1,0,0\n")
    with pytest.raises(HistomilError, match="lacks column.*size, is_tumour"):
        read_truth(tmp_path / "t.csv")


class _Attend(torch.nn.Module):
    """Attention = softmax of the first feature over the real tiles: a model whose attention is known."""

    def forward(self, x, mask=None):
        logit = x[..., 0].masked_fill(~mask.bool(), float("-inf")) if mask is not None else x[..., 0]
        return MILOutput(logits=torch.zeros(x.shape[0], 2), attention=torch.softmax(logit, dim=-1))


def test_patient_bag_attention_is_split_by_slide(truth) -> None:
    attrs = {"patch_size_level0": 100}
    f1 = np.array([[0.5], [0.9], [0.1], [0.2], [0.4], [0.3]], dtype=np.float32)
    f2 = np.array([[2.0], [0.0]], dtype=np.float32)
    s1 = FeatureBag("s1", f1, [""] * 6, 1, coords=COORDS, attrs=dict(attrs))
    s2 = FeatureBag("s2", f2, [""] * 2, 1, coords=COORDS[:2], attrs=dict(attrs))
    scores = attention_by_slide(_Attend(), [patient_bag("p1", [s1, s2], 1)])
    assert sorted(scores) == ["s1", "s2"] and len(scores["s1"].scores) == 6
    rows, _ = localise(scores, truth)
    assert rows[0]["auc"] == pytest.approx(0.75) and rows[0]["top1_hit"] == 1.0

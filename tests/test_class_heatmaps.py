"""Class-wise attention: CLAM-MB's per-class branches, attention x class score for other models, and
one slide heatmap per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.models.registry import build_model
from histomil.slides.class_heatmaps import class_scores, write_class_heatmaps
from histomil.training.checkpoint import load_checkpoint
from histomil.training.tasks import ClassificationTask, RegressionTask, task_from_checkpoint
from histomil.training.trainer import TrainConfig, train

D = 8
SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _bags(n: int, rng: np.random.Generator, tag: str) -> list[FeatureBag]:
    out = []
    for i in range(n):
        c = i % 3
        x = rng.normal(size=(10, D)).astype(np.float32)
        x[:3, c] += 3.0  # tiles 0-2 carry the class
        out.append(FeatureBag(f"{tag}{i}", x, [str(t) for t in range(10)], label=c))
    return out


def _task(n: int) -> ClassificationTask:
    task = ClassificationTask()
    task.restore({"n_classes": n})
    return task


def test_clam_mb_maps_are_its_class_branches() -> None:
    torch.manual_seed(0)
    model = build_model("clam_mb", D, 3).eval()
    bag = FeatureBag("b", np.random.default_rng(0).normal(size=(7, D)).astype(np.float32), [str(i) for i in range(7)])
    probs, scores, kind = class_scores(model, bag, _task(3))
    assert scores.shape == (3, 7) and "CLAM-MB" in kind
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)  # each branch is a softmax over the tiles
    with torch.no_grad():
        out = model(torch.from_numpy(bag.features)[None])
    predicted = int(np.argmax(probs))
    np.testing.assert_allclose(scores[predicted], out.attention[0].numpy(), atol=1e-6)  # CLAM's own heatmap class


def test_trained_model_points_each_class_to_its_tiles(tmp_path) -> None:
    rng = np.random.default_rng(0)
    result = train(_bags(60, rng, "t"), _bags(30, rng, "v"), TrainConfig(model="abmil", epochs=15, min_epochs=15, lr=2e-3), tmp_path)
    model, meta = load_checkpoint(result.model_path)
    task = task_from_checkpoint(meta)
    hits = 0
    test = _bags(30, rng, "x")
    for bag in test:
        _, scores, kind = class_scores(model, bag, task)
        assert kind == "attention x class score"
        hits += int(np.argmax(scores[bag.label]) < 3)  # the class's top tile is one of the tiles carrying it
    assert hits >= 27


def test_class_heatmaps_need_classes_and_coordinates(tmp_path) -> None:
    model = build_model("abmil", D, 1)
    bag = FeatureBag("b", np.zeros((4, D), np.float32), ["a", "b", "c", "d"])
    task = RegressionTask()
    task.restore({"mean": 0.0, "sd": 1.0})
    with pytest.raises(HistomilError, match="need a classification model"):
        class_scores(model, bag, task)
    with pytest.raises(HistomilError, match="no tile coordinates"):
        write_class_heatmaps(SLIDE, bag, build_model("abmil", D, 3), _task(3), tmp_path)


@pytest.mark.skipif(not SLIDE.is_file(), reason="shared test slide not present")
def test_one_slide_heatmap_per_class(tmp_path) -> None:
    rng = np.random.default_rng(1)
    coords = np.array([[x, y] for x in range(0, 2000, 224) for y in range(0, 2800, 224)])
    bag = FeatureBag("slide", rng.normal(size=(len(coords), D)).astype(np.float32), [f"{x}_{y}" for x, y in coords],
                     coords=coords, attrs={"patch_size_level0": 224})
    torch.manual_seed(0)
    paths = write_class_heatmaps(SLIDE, bag, build_model("clam_mb", D, 3).eval(), _task(3), tmp_path, ["normal", "low grade", "tumour"])
    assert [p.name for p in paths] == ["slide_class-normal.png", "slide_class-low_grade.png", "slide_class-tumour.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


@pytest.mark.skipif(not SLIDE.is_file(), reason="shared test slide not present")
def test_heatmap_command_by_class_from_features(tmp_path) -> None:
    from typer.testing import CliRunner

    from histomil.cli import app
    from histomil.features.store import write_feature_bag

    rng = np.random.default_rng(2)
    cfg = TrainConfig(model="clam_mb", epochs=2, min_epochs=2, task_options={"class_names": ["normal", "polyp", "tumour"]})
    result = train(_bags(30, rng, "t"), _bags(15, rng, "v"), cfg, tmp_path / "run")
    coords = np.array([[x, y] for x in range(0, 2000, 224) for y in range(0, 2800, 224)])
    write_feature_bag(tmp_path / "feats" / f"{SLIDE.stem}.h5",
                      FeatureBag(SLIDE.stem, rng.normal(size=(len(coords), D)).astype(np.float32),
                                 [f"{x}_{y}" for x, y in coords], coords=coords))
    run = CliRunner().invoke(app, ["heatmap", str(result.model_path), str(SLIDE), "--out", str(tmp_path / "hm"),
                                   "--features", str(tmp_path / "feats"), "--tile-size-level0", "224", "--by-class"])
    assert run.exit_code == 0, run.output
    names = sorted(p.name for p in (tmp_path / "hm" / "heatmaps").glob("*_class-*.png"))
    assert names == [f"{SLIDE.stem}_class-{n}.png" for n in ("normal", "polyp", "tumour")]

"""``run`` with ``ensemble_seeds``: several seeds trained, their mean probability is the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_runs import TINY_CROSSVAL

from histomil.features.formats import load_feature_dataset
from histomil.pipeline import load_config, run_study
from histomil.resources import example_tile_table
from histomil.training.checkpoint import load_checkpoint
from histomil.training.trainer import predict

pytestmark = pytest.mark.usefixtures("fast_encoder")


def _config(tmp_path: Path, **extra: object) -> Path:
    keys = ("columns", "study", "features", "train")
    cfg = {"tiles": str(example_tile_table()), **{k: TINY_CROSSVAL[k] for k in keys}, **extra}
    cfg["columns"] = {k: v for k, v in cfg["columns"].items() if k != "split"}
    cfg["train"] = {**cfg["train"], "epochs": 3}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ensemble_model_is_the_mean_of_its_seed_members(tmp_path: Path):
    cfg = load_config(_config(tmp_path, ensemble_seeds=2))
    out = tmp_path / "run"
    run_study(cfg, out, log=lambda _: None)
    members = [out / "model" / f"seed-{s}" / "model.pt" for s in (0, 1)]
    assert all(p.is_file() for p in members)
    model, meta = load_checkpoint(out / "model" / "model.pt")
    assert meta["model_name"] == "ensemble"
    test_set = next(p for p in sorted((out / "features").iterdir()) if p.name.startswith("test"))
    bags = load_feature_dataset(test_set, require_labels=True)
    p_ens = np.array([p[1] for p, _ in predict(model, bags)])
    p_members = [np.array([p[1] for p, _ in predict(load_checkpoint(m)[0], bags)]) for m in members]
    assert not np.allclose(p_members[0], p_members[1])  # two different seeds, two different models
    np.testing.assert_allclose(p_ens, np.mean(p_members, axis=0), atol=1e-6)


def test_ensemble_seeds_is_validated(tmp_path: Path):
    from histomil.errors import HistomilError

    with pytest.raises(HistomilError, match="ensemble_seeds"):
        load_config(_config(tmp_path, ensemble_seeds=0))

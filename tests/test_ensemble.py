"""Seed ensembles: several trained models combined into one checkpoint that averages probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_bags import toy_problem
from typer.testing import CliRunner

from histomil.cli import app
from histomil.training.checkpoint import combine_checkpoints, load_checkpoint, save_checkpoint
from histomil.training.trainer import TrainConfig, predict, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    train_bags, val_bags, _ = toy_problem()
    root = tmp_path_factory.mktemp("members")
    paths = []
    for seed, model in ((0, "gated_abmil"), (1, "gated_abmil"), (2, "abmil")):
        cfg = TrainConfig(model=model, model_kwargs={"embed_dim": 16, "attn_dim": 8}, epochs=2, lr=2e-3, min_epochs=0,
                          seed=seed)
        paths.append(train(train_bags, val_bags, cfg, root / f"s{seed}",
                           encoder_info={"name": "toy", "input_size": 1, "mean": [0] * 3, "std": [1] * 3}).model_path)
    return paths, val_bags


def test_ensemble_averages_the_members_probabilities_and_attention(members, tmp_path) -> None:
    paths, bags = members
    out = combine_checkpoints(paths, tmp_path / "ens.pt")
    ens, meta = load_checkpoint(out)
    assert meta["model_name"] == "ensemble" and meta["encoder_info"]["name"] == "toy" and meta["members"] == [str(p) for p in paths]
    got = predict(ens, bags)
    each = [predict(load_checkpoint(p)[0], bags) for p in paths]
    for i, (prob, att) in enumerate(got):
        np.testing.assert_allclose(prob, np.mean([e[i][0] for e in each], axis=0), atol=1e-6)
        np.testing.assert_allclose(att, np.mean([e[i][1] for e in each], axis=0), atol=1e-6)
        assert att.sum() == pytest.approx(1.0, abs=1e-5)


def test_members_must_take_the_same_features(members, tmp_path) -> None:
    paths, _ = members
    model, meta = load_checkpoint(paths[0])
    other = save_checkpoint(tmp_path / "other.pt", model, meta["model_name"], meta["model_kwargs"], 2,
                            {**meta["encoder_info"], "name": "uni_v1"}, None, in_dim=meta["in_dim"])
    r = CliRunner().invoke(app, ["ensemble", str(paths[0]), str(other), "--out", str(tmp_path / "e.pt")])
    assert r.exit_code == 2 and "encoder 'uni_v1'" in r.output and "\n" not in r.output.strip()
    r = CliRunner().invoke(app, ["ensemble", str(paths[0]), "--out", str(tmp_path / "e.pt")])
    assert r.exit_code == 2 and "at least two" in r.output
    r = CliRunner().invoke(app, ["ensemble", *map(str, paths[:2]), "--out", str(tmp_path / "e.pt")])
    assert r.exit_code == 0 and (tmp_path / "e.pt").is_file()
    assert isinstance(load_checkpoint(tmp_path / "e.pt")[0], torch.nn.Module)

"""Training loop, checkpoints and predict on small synthetic MIL problems."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from toy_bags import D, toy_problem

from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.models.registry import build_model
from histomil.training.checkpoint import load_checkpoint, save_checkpoint
from histomil.training.trainer import HISTORY_COLUMNS, TrainConfig, predict, train

SMALL = {"embed_dim": 32, "attn_dim": 16, "dropout": 0.1}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    return toy_problem()


def cfg(**kw) -> TrainConfig:
    base = {"model": "gated_abmil", "model_kwargs": SMALL, "epochs": 6, "lr": 2e-3, "min_epochs": 0, "patience": 50, "seed": 3}
    base.update(kw)
    return TrainConfig(**base)


def no_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_learns_toy_problem_and_attention_finds_witness(toy, tmp_path):
    train_bags, val_bags, witness = toy
    result = train(train_bags, val_bags, cfg(epochs=8), tmp_path)
    assert result.best_metrics["val_auc"] > 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model, _ = load_checkpoint(result.model_path)
    preds = predict(model, val_bags, batch_size=8)
    hits = [int(np.argmax(att)) == w for (_, att), w in zip(preds, witness) if w >= 0]
    assert np.mean(hits) > 0.8
    for (probs, att), bag in zip(preds, val_bags):
        assert att.shape == (len(bag),) and att.sum() == pytest.approx(1.0, abs=1e-5)
        assert probs.shape == (2,) and probs.sum() == pytest.approx(1.0)


def test_batched_training_with_subsampling_also_learns(toy, tmp_path):
    train_bags, val_bags, _ = toy
    result = train(train_bags, val_bags, cfg(epochs=10, batch_size=8, lr=5e-3, max_instances=10), tmp_path)
    assert result.best_metrics["val_auc"] > 0.9


def test_same_seed_same_history_and_weights(toy, tmp_path):
    train_bags, val_bags, _ = toy
    c = cfg(epochs=3, batch_size=4, max_instances=6)
    a = train(train_bags, val_bags, c, tmp_path / "a")
    torch.manual_seed(999)  # the caller's global RNG must not matter
    b = train(train_bags, val_bags, c, tmp_path / "b")
    assert no_seconds(a.history) == no_seconds(b.history)
    sa, sb = torch.load(a.model_path, weights_only=True), torch.load(b.model_path, weights_only=True)
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])
    other = train(train_bags, val_bags, cfg(epochs=3, batch_size=4, max_instances=6, seed=4), tmp_path / "c")
    assert no_seconds(other.history) != no_seconds(a.history)


def test_train_leaves_global_rng_untouched(toy, tmp_path):
    train_bags, val_bags, _ = toy
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(train_bags[:10], val_bags[:6], cfg(epochs=1), tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_early_stopping_waits_for_patience_and_min_epochs(toy, tmp_path):
    train_bags, val_bags, _ = toy
    # lr=0: val loss never improves after epoch 1, so only patience/min_epochs decide.
    r = train(train_bags, val_bags, cfg(epochs=20, lr=0.0, patience=2, min_epochs=0), tmp_path / "p")
    assert (r.epochs_run, r.best_epoch, r.stopped_early) == (3, 1, True)
    assert r.best_metrics["val_auc"] < 0.7  # untrained: the toy problem is not solved for free
    r = train(train_bags, val_bags, cfg(epochs=20, lr=0.0, patience=2, min_epochs=6), tmp_path / "m")
    assert (r.epochs_run, r.best_epoch, r.stopped_early) == (6, 1, True)
    r = train(train_bags, val_bags, cfg(epochs=4, lr=0.0, patience=10, min_epochs=0), tmp_path / "e")
    assert (r.epochs_run, r.stopped_early) == (4, False)


def test_resume_matches_uninterrupted_run(toy, tmp_path):
    train_bags, val_bags, _ = toy
    c = cfg(epochs=5, batch_size=3, max_instances=8)
    full = train(train_bags, val_bags, c, tmp_path / "full")

    class Crash(Exception):
        pass

    def crash_at_3(row):
        if row["epoch"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train(train_bags, val_bags, c, tmp_path / "resumed", on_epoch=crash_at_3)
    with open(tmp_path / "resumed" / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3  # the crash kept every finished epoch
    seen = []
    resumed = train(train_bags, val_bags, c, tmp_path / "resumed", resume=True, on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [4, 5]
    assert no_seconds(resumed.history) == no_seconds(full.history)
    assert resumed.best_epoch == full.best_epoch
    sa = torch.load(full.model_path, weights_only=True)["state_dict"]
    sb = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_changed_options_and_missing_state(toy, tmp_path):
    train_bags, val_bags, _ = toy
    train(train_bags[:10], val_bags[:6], cfg(epochs=1), tmp_path)
    with pytest.raises(HistomilError, match="lr"):
        train(train_bags[:10], val_bags[:6], cfg(epochs=2, lr=1e-2), tmp_path, resume=True)
    more = train(train_bags[:10], val_bags[:6], cfg(epochs=2), tmp_path, resume=True)  # more epochs is fine
    assert more.epochs_run == 2
    with pytest.warns(UserWarning, match="data changed .*bags, labels or feature values.*starts afresh"):
        other = train(train_bags[:12], val_bags[:6], cfg(epochs=2), tmp_path, resume=True)  # other data: restarts
    assert [r["epoch"] for r in other.history] == [1, 2]
    fresh = train(train_bags[:10], val_bags[:6], cfg(epochs=2), tmp_path / "new", resume=True)  # nothing to resume
    assert no_seconds(fresh.history) == no_seconds(more.history)
    again = train(train_bags[:10], val_bags[:6], cfg(epochs=2), tmp_path / "new", resume=True)  # finished: no-op
    assert again.history == fresh.history
    state = torch.load(tmp_path / "new" / "last.pt", weights_only=False)
    torch.save({**state, "ranks": 2}, tmp_path / "new" / "last.pt")  # as a run of 2 torchrun processes records
    with pytest.raises(HistomilError, match=r"cannot resume, the run was trained by 2 process\(es\) and this is 1"):
        train(train_bags[:10], val_bags[:6], cfg(epochs=3), tmp_path / "new", resume=True)
    (tmp_path / "new" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(HistomilError, match="last.pt: not a readable training state"):
        train(train_bags[:10], val_bags[:6], cfg(epochs=3), tmp_path / "new", resume=True)


def test_history_csv_content(toy, tmp_path):
    train_bags, val_bags, _ = toy
    result = train(train_bags, val_bags, cfg(epochs=3, lr=1e-3), tmp_path)
    with open(result.history_path) as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == HISTORY_COLUMNS
        rows = list(reader)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row, mem in zip(rows, result.history):
        for col in HISTORY_COLUMNS[1:]:
            assert float(row[col]) == mem[col]
        assert 0.0 <= float(row["val_auc"]) <= 1.0 and 0.0 <= float(row["train_acc"]) <= 1.0
        assert float(row["lr"]) == 1e-3 and float(row["seconds"]) > 0
    # val_loss is the mean cross-entropy of the best model: recompute it from model.pt.
    model, meta = load_checkpoint(result.model_path)
    probs = np.stack([p for p, _ in predict(model, val_bags)])
    labels = np.array([b.label for b in val_bags])
    recomputed = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
    assert recomputed == pytest.approx(result.best_metrics["val_loss"], rel=1e-5)
    assert meta["extra"]["best_epoch"] == meta["best_epoch"] == result.best_epoch
    assert meta["extra"]["metrics"]["val_loss"] == min(r["val_loss"] for r in result.history)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("abmil", D, 3, embed_dim=8, attn_dim=4).eval()
    info = {"name": "fake-encoder", "input_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    path = save_checkpoint(
        tmp_path / "m.pt", model, "abmil", {"embed_dim": 8, "attn_dim": 4}, 3, info, cfg(), extra={"best_epoch": 4}
    )
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)
    assert meta["encoder_info"] == info and meta["n_classes"] == 3 and meta["in_dim"] == D
    assert meta["train_config"]["model"] == "gated_abmil" and meta["extra"]["best_epoch"] == 4
    assert "histomil_version" in meta and "state_dict" not in meta
    assert not list(tmp_path.glob(".*tmp"))  # no leftover temp files


def test_checkpoint_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(HistomilError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(HistomilError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(HistomilError, match="other.pt: not a histomil model checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    model = build_model("abmil", D, embed_dim=8)
    save_checkpoint(tmp_path / "bad.pt", model, "abmil", {"embed_dim": 4}, 2, None, None)  # kwargs do not match weights
    with pytest.raises(HistomilError, match="bad.pt: weights do not match"):
        load_checkpoint(tmp_path / "bad.pt")


def test_predict_keeps_order_and_matches_single_bag_calls(toy):
    _, val_bags, _ = toy
    torch.manual_seed(0)
    model = build_model("gated_abmil", D, **SMALL)
    model.train()
    batched = predict(model, val_bags, batch_size=7)
    assert model.training  # mode restored
    single = predict(model, val_bags, batch_size=1)
    for (pa, aa), (pb, ab), bag in zip(batched, single, val_bags):
        assert aa.shape == (len(bag),)
        np.testing.assert_allclose(pa, pb, atol=1e-5)
        np.testing.assert_allclose(aa, ab, atol=1e-6)


@pytest.mark.parametrize("name", ["abmil", "transmil", "clam_sb"])
def test_predict_in_bf16_stays_close_to_fp32(toy, name):
    _, val_bags, _ = toy
    torch.manual_seed(0)
    model = build_model(name, D)
    fp32 = predict(model, val_bags)
    bf16 = predict(model, val_bags, precision="bf16")
    for (pa, aa), (pb, ab) in zip(fp32, bf16):
        assert pb.dtype == np.float64 and abs(pb.sum() - 1) < 1e-6
        np.testing.assert_allclose(pa, pb, atol=2e-2)
        if not np.isnan(aa).all():
            np.testing.assert_allclose(aa, ab, atol=2e-2)
    with pytest.raises(HistomilError, match="precision must be 'fp32', 'bf16' or 'fp16'"):
        predict(model, val_bags, precision="fp8")
    with pytest.raises(HistomilError, match="precision fp16 runs only on a CUDA GPU"):
        predict(model, val_bags, precision="fp16")


def test_val_auc_monitor_falls_back_on_one_class_val(toy, tmp_path):
    train_bags, val_bags, _ = toy
    negatives = [b for b in val_bags if b.label == 0][:6]
    with pytest.warns(UserWarning, match="monitoring val_loss"):
        result = train(train_bags[:10], negatives, cfg(epochs=2, monitor="val_auc"), tmp_path)
    assert result.monitor == "val_loss"
    assert all(math.isnan(r["val_auc"]) for r in result.history)
    assert result.model_path.is_file()


def _bag(bag_id, feats, label=1):
    return FeatureBag(bag_id, np.asarray(feats, dtype=np.float32), [str(i) for i in range(len(feats))], label=label)


def test_bad_bags_are_clear_errors(toy, tmp_path):
    train_bags, val_bags, _ = toy
    tb, vb = train_bags[:6], val_bags[:4]
    cases = [
        ([*tb, _bag("empty", np.zeros((0, D)))], vb, "'empty' has no tiles"),
        ([*tb, _bag("wide", np.zeros((3, D + 1)))], vb, "'wide' has 17-dim features"),
        ([*tb, _bag("nolabel", np.zeros((3, D)), label=None)], vb, "'nolabel' has no label"),
        ([*tb, _bag("nan", np.full((3, D), np.nan))], vb, "'nan' has NaN"),
        ([b for b in tb if b.label == 1], vb, "need at least two classes"),
        (tb, [], "no validation bags"),
    ]
    for t, v, msg in cases:
        with pytest.raises(HistomilError, match=msg):
            train(t, v, cfg(epochs=1), tmp_path)
    with pytest.raises(HistomilError, match="train.yaml: model: unknown model 'nope'"):
        TrainConfig.parse({"model": "nope"}, "train.yaml")  # refused when the config is read, before any work
    with pytest.raises(HistomilError, match="patience"):
        TrainConfig.parse({"patience": 0}, "train.yaml")
    with pytest.raises(HistomilError, match="train.yaml: .*epochz"):
        TrainConfig.parse({"epochz": 3}, "train.yaml")


def test_divergence_is_reported(toy, tmp_path):
    train_bags, val_bags, _ = toy
    bad = [_bag("huge", np.full((3, D), 3e38), label=1), *train_bags[:6]]
    with pytest.raises(HistomilError, match="diverged"):
        train(bad, val_bags[:4], cfg(epochs=1, lr=1.0, model_kwargs={"embed_dim": None}), tmp_path)


def test_three_classes_class_weights_and_encoder_info(tmp_path):
    rng = np.random.default_rng(5)
    attrs = {"encoder": "enc-a", "input_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}

    def bag(i, label):
        feats = rng.normal(size=(6, D)).astype(np.float32)
        feats[0, label] += 3.0
        return FeatureBag(f"c{i}", feats, [str(j) for j in range(6)], label=label, attrs=dict(attrs))

    labels = [0] * 20 + [1] * 6 + [2] * 6  # unbalanced
    bags = [bag(i, lab) for i, lab in enumerate(labels)]
    val = [bag(100 + i, i % 3) for i in range(12)]
    plain = train(bags, val, cfg(epochs=1, model="abmil"), tmp_path / "plain")
    weighted = train(bags, val, cfg(epochs=1, model="abmil", class_weights=True), tmp_path / "weighted")
    assert plain.n_classes == 3 and 0.0 <= plain.history[0]["val_auc"] <= 1.0  # one-vs-rest AUC
    assert weighted.history[0]["train_loss"] != plain.history[0]["train_loss"]
    _, meta = load_checkpoint(plain.model_path)
    assert meta["encoder_info"] == {"name": "enc-a", "encoder_canonical": "enc_a", "input_size": 224, "mean": attrs["mean"],
                                    "std": attrs["std"]}
    given = train(bags, val, cfg(epochs=1, model="abmil"), tmp_path / "given", encoder_info=dict(attrs))
    assert load_checkpoint(given.model_path)[1]["encoder_info"]["name"] == "enc-a"  # file attrs accepted as info
    val[0].attrs["encoder"] = "enc-b"
    with pytest.raises(HistomilError, match="features of encoder 'enc-b'.*train on features of one encoder"):
        train(bags, val, cfg(epochs=1), tmp_path / "mixed")


def _denormals_flushed() -> bool:
    return torch.tensor([1e-323], dtype=torch.float64).item() == 0.0


def test_training_and_prediction_flush_denormals(toy, tmp_path):
    """Denormal floats are flushed to zero in the training loop and in predict (no late-epoch slowdown)."""
    train_bags, val_bags, _ = toy
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    assert not _denormals_flushed()
    flushed = []
    try:
        train(train_bags[:6], val_bags[:4], cfg(epochs=2), tmp_path, on_epoch=lambda r: flushed.append(_denormals_flushed()))
        assert flushed == [True, True]
        torch.set_flush_denormal(False)
        predict(build_model("abmil", D, 2), [np.ones((3, D), dtype=np.float32)])
        assert _denormals_flushed()
    finally:
        torch.set_flush_denormal(False)


def test_training_modules_share_public_names_only_and_import_no_cycle():
    """The trainers share the loop and helpers through public names; checkpoint loading sits above them."""
    import ast
    from pathlib import Path

    import histomil.training

    folder = Path(histomil.training.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("histomil.training."):
                deps.add(node.module.rsplit(".", 1)[1])
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
        graph[path.stem] = deps

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)], graph
    assert not reaches("trainer", "pixels") and not reaches("pixels", "trainer")
    assert "pixels" in graph["checkpoint"] and not reaches("checkpoint_file", "pixels")

"""Streamed training of bags with continuous targets (regression: ``case,target``; survival:
``case,time,event``): the same bags, targets, checks, history, weights and fingerprint as in memory,
without holding features before they are used; slide-cohort crossval of both tasks under ``--stream``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histomil.cli import app
from histomil.data.targets import load_task_bags, read_task_training_folder
from histomil.errors import HistomilError
from histomil.features import lazy
from histomil.features.lazy import LazyFeatureBag
from histomil.features.store import FeatureBag, write_feature_bag
from histomil.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
D = 8
HEADER = {"regression": "case,target", "survival": "case,time,event"}


def write_task_folder(folder: Path, task: str, n: int, seed: int, stored: int = 0) -> Path:
    """``n`` bags of 10-30 tiles whose target grows with the share of shifted tiles, in ``folder`` with a
    targets.csv; the first ``stored`` files also store their target (which the CSV repeats)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [HEADER[task]]
    for i in range(n):
        n_tiles = int(rng.integers(10, 31))
        share = float(rng.uniform(0, 1))
        x = rng.normal(size=(n_tiles, D)).astype(np.float32)
        x[: int(round(share * n_tiles)), 0] += 3.0
        if task == "regression":
            target: tuple[float, ...] = (round(share, 6),)
        else:
            target = (round(float(rng.exponential(np.exp(-2 * share))) + 0.01, 6), float(rng.uniform() < 0.7))
        bag_id = f"{folder.name}{i:02d}"
        write_feature_bag(folder / f"{bag_id}.h5", FeatureBag(bag_id, x, [str(t) for t in range(n_tiles)],
                                                              target=target if i < stored else None))
        lines.append(",".join([bag_id, *(repr(v) for v in target)]))
    (folder / "targets.csv").write_text("\n".join(lines) + "\n")
    return folder


def rows(history: list[dict]) -> np.ndarray:
    return np.array([[r[c] for c in r if c != "seconds"] for r in history], dtype=np.float64)


@pytest.mark.parametrize("task", ["regression", "survival"])
def test_streamed_training_equals_in_memory_training(tmp_path: Path, task: str, monkeypatch) -> None:
    """Same history and weights (sub-sampling included), no features held before use, and a run
    resumed with the other kind of bags finds the same fingerprint (its finished epochs are kept)."""
    tr = write_task_folder(tmp_path / "t", task, 20, seed=1, stored=3)
    va = write_task_folder(tmp_path / "v", task, 8, seed=2)
    loads = {"n": 0}
    real_load = LazyFeatureBag.load

    def counted(self: LazyFeatureBag) -> FeatureBag:
        loads["n"] += 1
        return real_load(self)

    monkeypatch.setattr(LazyFeatureBag, "load", counted)
    eager = [read_task_training_folder(f, task, stream="off") for f in (tr, va)]
    streamed = [read_task_training_folder(f, task, stream="on") for f in (tr, va)]
    assert loads["n"] == 0  # scanned once, targets attached: nothing loaded yet
    for e, s in zip(eager, streamed):
        assert all(isinstance(b, LazyFeatureBag) and "features" not in vars(b) for b in s)
        assert [(b.bag_id, b.target, b.shape) for b in s] == [(b.bag_id, b.target, b.features.shape) for b in e]
    cfg = TrainConfig(task=task, model="gated_abmil", epochs=3, min_epochs=0, batch_size=4, max_instances=12, seed=7,
                      model_kwargs={"embed_dim": 16, "attn_dim": 8})
    mem = train(*eager, cfg, tmp_path / "mem")
    lz = train(*streamed, cfg, tmp_path / "lazy")
    assert loads["n"] > 0 and all("features" not in vars(b) for b in streamed[0] + streamed[1])  # read when used, not kept
    np.testing.assert_allclose(rows(lz.history), rows(mem.history), rtol=0, atol=1e-6)
    a = torch.load(mem.model_path, weights_only=False)["state_dict"]
    b = torch.load(lz.model_path, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    again = train(*[read_task_training_folder(f, task, stream="on") for f in (tr, va)], cfg.model_copy(update={"epochs": 4}),
                  tmp_path / "mem", resume=True)
    assert again.epochs_run == 4 and again.history[:3] == mem.history  # same "seconds" too: resumed, not retrained


def test_stream_auto_follows_the_memory_rule(tmp_path: Path, monkeypatch) -> None:
    folder = write_task_folder(tmp_path / "t", "survival", 4, seed=3)
    monkeypatch.setattr(lazy, "physical_memory_bytes", lambda: 10**12)
    loaded = read_task_training_folder(folder, "survival", stream="auto")
    assert not any(isinstance(b, LazyFeatureBag) for b in loaded)
    assert [b.target for b in loaded] == [b.target for b in load_task_bags(folder, "survival")]
    monkeypatch.setattr(lazy, "physical_memory_bytes", lambda: 1000)  # a quarter of 1 kB: too small
    assert all(isinstance(b, LazyFeatureBag) for b in read_task_training_folder(folder, "survival", stream="auto"))
    with pytest.raises(HistomilError, match="stream must be auto, on or off"):
        read_task_training_folder(folder, "survival", stream="yes")


def test_targets_csv_problems_are_the_same_errors_streamed(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    for i in range(3):
        write_feature_bag(folder / f"b{i}.h5", FeatureBag(f"b{i}", np.ones((2, D), np.float32), ["a", "b"],
                                                          target=(0.5,) if i == 0 else None))
    cases = [
        "case,value\nb0,1\n",  # no target column
        "case,target\nb0,0.5\nb1,abc\n",  # not a number
        "case,target\nb0,0.7\nb1,1\nb2,2\n",  # the stored target disagrees
        "case,target\nb0,0.5\nb1,1\n",  # a file without target
        "case,target\nb0,0.5\nb1,1\nb2,2\nb9,3\n",  # a case without file
    ]
    for text in cases:
        (folder / "targets.csv").write_text(text)
        messages = []
        for stream in ("off", "on", "auto"):
            with pytest.raises(HistomilError) as err:
                read_task_training_folder(folder, "regression", stream=stream)
            messages.append(str(err.value))
        assert len(set(messages)) == 1 and "\n" not in messages[0], messages
    (folder / "targets.csv").unlink()
    (folder / "b0.h5").unlink()  # no targets.csv and files without a stored target
    with pytest.raises(HistomilError, match="2 feature file"):
        read_task_training_folder(folder, "regression", stream="on")


def test_cli_trains_a_streamed_regression_and_reports_csv_errors_alike(tmp_path: Path) -> None:
    tr = write_task_folder(tmp_path / "t", "regression", 12, seed=4)
    va = write_task_folder(tmp_path / "v", "regression", 6, seed=5)
    runner = CliRunner()
    base = ["train", str(tr), "--val", str(va), "--task", "regression", "--model", "mean_pool", "--epochs", "2",
            "--min-epochs", "2"]
    outs = {}
    for mode in ("off", "on"):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / mode), "--stream", mode])
        assert result.exit_code == 0, result.output
        outs[mode] = rows(list(csv.DictReader(open(tmp_path / mode / "history.csv", newline=""))))
    np.testing.assert_allclose(outs["on"], outs["off"], rtol=0, atol=1e-6)
    lines = (tr / "targets.csv").read_text().splitlines()
    (tr / "targets.csv").write_text("\n".join(lines[:-1]) + "\n")  # the last file loses its target
    errors = []
    for mode in ("off", "on"):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / f"bad_{mode}"), "--stream", mode])
        assert result.exit_code != 0
        errors.append(result.output)
    assert errors[0] == errors[1] and "1 feature file(s) have no target: t11" in errors[0]


@pytest.mark.parametrize("task", ["regression", "survival"])
def test_cohort_crossval_of_targets_streamed_gives_the_in_memory_results(tmp_path: Path, task: str) -> None:
    """``crossval --table --task regression|survival --stream on``: slide bags stay in their files (patient bags
    combined when read, carrying their patient's target) and the out-of-fold table is the in-memory one."""
    import json

    if task == "regression":
        from test_regression_crossval import write_regression_cohort

        table, feats, _ = write_regression_cohort(tmp_path, n_patients=12)
        task_args = ["--task", "regression", "--target", "score"]
    else:
        from test_survival_crossval import write_survival_cohort

        table, feats, _ = write_survival_cohort(tmp_path, n_patients=16)
        task_args = ["--task", "survival", "--time", "os_months", "--event", "dead"]
    args = ["crossval", "--table", str(table), "--features", str(feats), *task_args, "--folds", "3", "--epochs", "2",
            "--set", "train.min_epochs=1", "--set", "train.batch_size=6", "--set", "train.threads=1",
            "--set", "bootstrap_resamples=0", "--set", "report=false",
            "--set", "train.model_kwargs={embed_dim: 16, attn_dim: 8}"]
    for mode in ("off", "on"):
        result = CliRunner().invoke(app, [*args, "--stream", mode, "--out", str(tmp_path / mode)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "on" / "oof_predictions.csv").read_text() == (tmp_path / "off" / "oof_predictions.csv").read_text()
    digests = [json.loads((tmp_path / m / "inputs.json").read_text())["features_digest"] for m in ("off", "on")]
    assert digests[0] == digests[1]

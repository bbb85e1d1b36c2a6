"""DistributedDataParallel training under torchrun (2 CPU processes, gloo) against one process.

The equivalence tested: 2 ranks x batch_size 1 take the same optimizer steps as 1 process x batch_size 2
(every rank draws the same bag order and tile subsets, rank r trains on positions r, r + 2, ...; DDP
averages the two ranks' gradients, which is the gradient of the 2-bag batch's mean loss). So the
histories agree epoch by epoch and the weights agree, up to float32 summation order (tolerance 1e-5),
for a model without dropout (dropout masks are drawn per rank). Exactly one set of run files is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_files import invoke
from histomil.features.store import write_feature_bag
from toy_bags import make_bags
from torchrun_cli import history, torchrun

CONFIG = "model: gated_abmil\nmodel_kwargs: {dropout: 0.0}\nmax_instances: 8\nlr: 0.001\nlabel_smoothing: 0.1\n"


def write_folder(folder: Path, n: int, seed: int, prefix: str) -> Path:
    folder.mkdir(parents=True)
    for b in make_bags(n, seed=seed, prefix=prefix)[0]:
        write_feature_bag(folder / f"{b.bag_id}.h5", b)
    return folder


def histomil_train(tmp: Path, out: str, ranks: int, batch_size: int, epochs: int, stream: str = "off") -> object:
    args = ["train", tmp / "train", "--val", tmp / "val", "--out", tmp / out, "--config", tmp / "cfg.yaml",
            "--batch-size", batch_size, "--epochs", epochs, "--min-epochs", 0, "--seed", 3, "--stream", stream]
    if ranks == 1:  # in this process: saves an interpreter start
        done = invoke(*args)
        assert done.exit_code == 0, done.output
        return done
    return torchrun(args, ranks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    write_folder(tmp / "train", 20, seed=1, prefix="b")
    write_folder(tmp / "val", 8, seed=2, prefix="v")
    (tmp / "cfg.yaml").write_text(CONFIG)
    histomil_train(tmp, "one", ranks=1, batch_size=2, epochs=4)
    histomil_train(tmp, "two", ranks=2, batch_size=1, epochs=3, stream="on")
    (tmp / "first_three.csv").write_bytes((tmp / "two" / "history.csv").read_bytes())
    histomil_train(tmp, "two", ranks=2, batch_size=1, epochs=4, stream="on")  # resumes from epoch 3 on both ranks
    return tmp


def test_two_ranks_match_one_process_with_the_doubled_batch(runs: Path) -> None:
    one, two = history(runs / "one"), history(runs / "two")
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == [1, 2, 3, 4]
    (runs / "resumed").mkdir(exist_ok=True)
    (runs / "resumed" / "history.csv").write_bytes((runs / "first_three.csv").read_bytes())
    assert two[:3] == history(runs / "resumed")  # epochs 1-3 kept (their seconds too): resumed, not retrained
    for a, b in zip(one, two):
        for col in a:
            if col != "seconds":
                assert b[col] == pytest.approx(a[col], abs=1e-5), (col, a, b)
    w1 = torch.load(runs / "one" / "model.pt", weights_only=False)["state_dict"]
    w2 = torch.load(runs / "two" / "model.pt", weights_only=False)["state_dict"]
    assert not any(k.startswith("module.") for k in w2)  # saved from the model, not its DDP wrapper
    for k in w1:
        np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), atol=1e-5)


def test_rank_zero_alone_writes_one_run_folder(runs: Path) -> None:
    names = sorted(p.name for p in (runs / "two").iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in (runs / "one").iterdir() if not p.name.startswith("."))
    assert names.count("model.pt") == 1 and "last.pt" in names and not any(n.endswith(".tmp") for n in names)
    import json

    summary = json.loads((runs / "two" / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 4
    assert all(m["peak_rss_mib"] > 0 for m in summary["peak_memory_per_rank"])
    assert json.loads((runs / "one" / "training.json").read_text())["world_size"] == 1


def test_crossval_folds_spread_over_ranks_give_the_single_process_results(tmp_path: Path) -> None:
    """torchrun with 2 ranks: folds 0 and 2 on rank 0, fold 1 on rank 1, each trained by one process, so
    the out-of-fold predictions equal one process's exactly; rank 0 alone writes the results."""
    from cohort_data import write_cohort

    table, feats, _ = write_cohort(tmp_path)
    args = ["crossval", "--table", table, "--features", feats, "--target", "label", "--folds", "3", "--epochs", "4",
            "--set", "train.min_epochs=2", "--set", "bootstrap_resamples=0", "--set", "report=false"]
    one = invoke(*args, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
                          "histomil", *map(str, args), "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env=env, timeout=240)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("| pooled, seed-0 |") == 1  # the table is shown once, by rank 0
    assert (tmp_path / "two" / "oof_predictions.csv").read_text() == (tmp_path / "one" / "oof_predictions.csv").read_text()
    import json

    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["pooled"] == m1["pooled"] and m2["mean_over_folds"] == m1["mean_over_folds"]

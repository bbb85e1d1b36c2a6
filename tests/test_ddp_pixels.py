"""``train-pixels`` under torchrun (2 CPU processes, gloo) against one process.

The equivalence tested: 2 ranks x ``bags_per_step`` 1 take the optimizer steps of 1 process x
``bags_per_step`` 2 (gradients of two bags accumulated per step). Every rank draws the same bag order,
tile sub-samples and augmentation seeds; rank r trains on positions r, r + 2, ... and DDP averages the
two ranks' gradients, which is the gradient of the two bags' mean loss. So the histories and weights
agree up to float32 rounding for a model without dropout (measured on our 2-core CPU: bitwise equal, as
halving is exact; the test allows 1e-5 relative + 1e-6 absolute for other kernels and summation orders) (dropout masks are drawn per rank). The encoder is a partly frozen
EfficientNet (finetune=last_blocks) encoded in checkpointed chunks of 2 tiles, with augmentation and tile
sub-sampling on. The two-rank run is interrupted after epoch 2 and resumed; rank 0 alone writes the run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feature_files import invoke
from torchrun_cli import history, torchrun

TILE = 32
CONFIG = (
    "backbone: efficientnet_lite0\npretrained: false\nfinetune: last_blocks\ninput_size: 32\ntile_chunk: 2\n"
    "precision: fp32\nmax_tiles: 3\naugment_p: 0.5\nlr: 0.003\nencoder_lr: 0.001\npatience: 50\nthreads: 1\n"
    "model_kwargs: {embed_dim: 16, attn_dim: 8, dropout: 0.0}\n"
)
RTOL, ATOL = 1e-5, 1e-6


def write_bags(root: Path, n_bags: int, seed: int) -> Path:
    """A bag root folder of 4 pink-noise tiles per bag (labels.csv beside them); positive bags hold a dark square."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_bags):
        (root / str(i)).mkdir(parents=True)
        for j in range(4):
            img = np.clip(rng.normal([220, 170, 200], 12, size=(TILE, TILE, 3)), 0, 255)
            if i % 2 and j < 2:
                y, x = rng.integers(0, TILE - 14, size=2)
                img[y : y + 14, x : x + 14] = [70, 30, 110]
            Image.fromarray(img.astype(np.uint8)).save(root / str(i) / f"tile_{j}.png")
        rows.append((str(i), i % 2))
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("case", "y_true"), *rows])
    return root


def args(tmp: Path, out: str, bags_per_step: int, epochs: int, workers: int) -> list[str]:
    return [str(a) for a in ("train-pixels", tmp / "train", "--val", tmp / "val", "--out", tmp / out, "--config",
                             tmp / "cfg.yaml", "--bags-per-step", bags_per_step, "--epochs", epochs, "--min-epochs", 0,
                             "--seed", 5, "--workers", workers)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp_pixels")
    write_bags(tmp / "train", 8, seed=1)
    write_bags(tmp / "val", 3, seed=2)  # 3 validation bags over 2 ranks: shards of 2 and 1
    (tmp / "cfg.yaml").write_text(CONFIG)
    one = invoke(*args(tmp, "one", bags_per_step=2, epochs=3, workers=0))
    assert one.exit_code == 0, one.output
    torchrun(args(tmp, "two", bags_per_step=1, epochs=2, workers=1))
    (tmp / "first_two.csv").write_bytes((tmp / "two" / "history.csv").read_bytes())
    done = torchrun(args(tmp, "two", bags_per_step=1, epochs=3, workers=1))  # resumes from epoch 2 on both ranks
    (tmp / "resume_stderr.txt").write_text(done.stderr)
    return tmp


def test_two_ranks_match_one_process_with_two_bags_per_step(runs: Path) -> None:
    one, two = history(runs / "one"), history(runs / "two")
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == [1, 2, 3]
    (runs / "first").mkdir(exist_ok=True)
    (runs / "first" / "history.csv").write_bytes((runs / "first_two.csv").read_bytes())
    assert two[:2] == history(runs / "first")  # epochs 1-2 kept (their seconds too): resumed, not retrained
    assert (runs / "resume_stderr.txt").read_text().count("resuming from") == 1  # said by rank 0 only
    for a, b in zip(one, two):
        for col in a:
            if col != "seconds":
                assert b[col] == pytest.approx(a[col], rel=RTOL, abs=ATOL), (col, a, b)
    assert one[-1]["train_loss"] != one[0]["train_loss"]  # it trained
    for name, key in (("model.pt", "state_dict"), ("last.pt", "model_state")):
        w1 = torch.load(runs / "one" / name, weights_only=False)[key]
        w2 = torch.load(runs / "two" / name, weights_only=False)[key]
        assert w1.keys() == w2.keys()  # saved from the model, not its DDP wrapper (no "module.")
        for k in w1:
            np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{name} {k}")


def test_rank_zero_alone_writes_one_run_folder(runs: Path) -> None:
    names = sorted(p.name for p in (runs / "two").iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in (runs / "one").iterdir() if not p.name.startswith("."))
    assert names.count("model.pt") == 1 and "last.pt" in names and not any(n.endswith(".tmp") for n in names)
    summary = json.loads((runs / "two" / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 3


def test_resuming_under_another_process_count_is_a_one_line_error(runs: Path) -> None:
    before = (runs / "two" / "last.pt").read_bytes()
    done = invoke(*args(runs, "two", bags_per_step=1, epochs=4, workers=0))
    assert done.exit_code != 0
    assert "cannot resume" in done.output and "2 process(es)" in done.output and "--no-resume" in done.output
    assert "Traceback" not in done.output
    assert (runs / "two" / "last.pt").read_bytes() == before  # nothing of the run was touched


def test_a_run_from_before_bags_per_step_resumes(tmp_path: Path) -> None:
    """A last.pt whose config has no bags_per_step (older histomil) resumes: the run used the default, 1."""
    from histomil.data.bags import load_bags
    from histomil.training.pixels import PixelTrainConfig, train_pixels

    train, val = load_bags(write_bags(tmp_path / "train", 4, seed=1)), load_bags(write_bags(tmp_path / "val", 2, seed=2))
    cfg = PixelTrainConfig(backbone="original", model="gated_abmil", input_size=TILE, epochs=1, min_epochs=0,
                           num_workers=0, precision="fp32", threads=1,
                           model_kwargs={"embed_dim": 8, "attn_dim": 4, "dropout": 0.0})
    train_pixels(train, val, cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    del state["config"]["bags_per_step"]
    torch.save(state, tmp_path / "run" / "last.pt")
    more = train_pixels(train, val, cfg.model_copy(update={"epochs": 2}), tmp_path / "run", resume=True)
    assert [r["epoch"] for r in more.history] == [1, 2]

"""Resume never trusts stale outputs (issue 12, item 3): changed tiles, labels, features, precision or
settings are noticed on the next run, and kill -9 at a random point then rerun gives the outputs of an
uninterrupted run. The killed runs are real subprocesses of the CLI (with the fast stand-in encoder)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_runs import FAST_ENCODER, TINY_CROSSVAL, ColourStats
from toy_bags import make_bags
from typer.testing import CliRunner

from histomil.cli import app
from histomil.errors import HistomilError
from histomil.features.encoders import ENCODERS, EncoderInfo, TileEncoder
from histomil.features.formats import load_feature_dataset
from histomil.features.store import read_feature_bag, write_feature_bag
from histomil.resources import example_tile_table
from histomil.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("fast_encoder", "one_thread")

TESTS = Path(__file__).resolve().parent
CONV_ENCODER = "test_conv_stats"
# The CLI in a subprocess, with the fast encoder registered; SLOW_WRITES=s sleeps s seconds before each
# bag feature file and each epoch's training state, so a kill lands in the middle of the work.
DRIVER = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
from tiny_runs import FAST_ENCODER, colour_stats_encoder
from histomil.features.encoders import ENCODERS
ENCODERS[FAST_ENCODER] = colour_stats_encoder
delay = float(os.environ.get("SLOW_WRITES", "0"))
if delay:
    import histomil.features.extract as ex, histomil.training.loop as lp
    def slowly(fn):
        return lambda *a, **k: (time.sleep(delay), fn(*a, **k))[1]
    ex.write_feature_bag, lp.save_state = slowly(ex.write_feature_bag), slowly(lp.save_state)
from histomil.cli import app
app(sys.argv[1:], prog_name="histomil")
"""


class ConvStats(ColourStats):
    """The fast encoder behind a fixed 1x1 convolution, so bf16 autocast changes its features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 1.37 + 0.11)
            self.conv.bias.fill_(0.013)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(self.conv(x))


def conv_stats_encoder(pretrained: bool = True, precision: str = "fp32", channels_last: bool = False) -> TileEncoder:
    info = EncoderInfo(name=CONV_ENCODER, input_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dim=96)
    return TileEncoder(ConvStats(), info, precision=precision, channels_last=channels_last).eval()


@pytest.fixture(autouse=True)
def conv_encoder(monkeypatch):
    monkeypatch.setitem(ENCODERS, CONV_ENCODER, conv_stats_encoder)


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def cli_error(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def bag_root(tmp_path: Path, n_bags: int = 4, size: int = 4) -> Path:
    """``n_bags`` bag folders of ``size`` copied example tiles each, labelled 0/1 alternately."""
    tiles = sorted(example_tile_table().parent.rglob("*.jpg"))
    root = tmp_path / "bags"
    for b in range(n_bags):
        (root / f"b{b}").mkdir(parents=True)
        for t in tiles[b * size : (b + 1) * size]:
            shutil.copyfile(t, root / f"b{b}" / t.name)
    (root / "labels.csv").write_text("case,y_true\n" + "".join(f"b{b},{b % 2}\n" for b in range(n_bags)))
    return root


def extract(root: Path, out: Path, *extra: str) -> str:
    return cli("features", "extract", root, out, "--encoder", FAST_ENCODER, "--precision", "fp32", "--workers", "0",
               "--runtime", "torch", *extra)


def same_files(a: Path, b: Path) -> None:
    """Two feature folders hold the same bags: features, tiles and labels."""
    names = sorted(p.name for p in a.glob("*.h5"))
    assert names == sorted(p.name for p in b.glob("*.h5")) and names
    for name in names:
        fa, fb = read_feature_bag(a / name), read_feature_bag(b / name)
        assert np.array_equal(fa.features, fb.features) and fa.label == fb.label
        assert [Path(p).name for p in fa.tile_paths] == [Path(p).name for p in fb.tile_paths]


# --- changed inputs --------------------------------------------------------------------------


def test_changed_and_added_tiles_are_encoded_again(tmp_path: Path):
    root, out = bag_root(tmp_path), tmp_path / "out"
    extract(root, out)
    other = sorted(example_tile_table().parent.rglob("*.jpg"))[40:42]
    shutil.copyfile(other[0], next(iter(sorted((root / "b0").iterdir()))))  # same name, other pixels
    shutil.copyfile(other[1], root / "b1" / "zz_added.jpg")
    message = extract(root, out)
    assert "2 written, 2 already done, 2 redone" in " ".join(message.split())
    assert len(read_feature_bag(out / "b1.h5")) == 5
    extract(root, tmp_path / "fresh")  # what a first extraction of the changed bags gives
    same_files(out, tmp_path / "fresh")


def test_corrected_label_is_rewritten_and_train_notices(tmp_path: Path):
    root, out = bag_root(tmp_path, n_bags=6), tmp_path / "out"
    extract(root, out)
    features_before = read_feature_bag(out / "b2.h5").features
    run = tmp_path / "run"
    train_args = ("train", out, "--val", out, "--out", run, "--epochs", "2", "--min-epochs", "1", "--batch-size", "2")
    cli(*train_args)
    (root / "labels.csv").write_text((root / "labels.csv").read_text().replace("b2,0", "b2,1"))
    message = " ".join(extract(root, out).split())
    assert "1 relabelled" in message and "0 encoded" in message
    relabelled = read_feature_bag(out / "b2.h5")
    assert relabelled.label == 1 and np.array_equal(relabelled.features, features_before)
    assert "b2,1" in (out / "labels.csv").read_text()  # the sidecar and the feature file agree
    retrained = " ".join(cli(*train_args).split())
    assert "warning:" in retrained and "data changed" in retrained and "starts afresh" in retrained
    fresh = tmp_path / "fresh"
    cli(*train_args[:5], fresh, *train_args[6:])
    a = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(fresh / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_restarts_when_feature_values_change(tmp_path: Path):
    train_bags, _ = make_bags(12, seed=1)
    val_bags, _ = make_bags(6, seed=2, prefix="v")
    cfg = TrainConfig(epochs=2, min_epochs=1, batch_size=2, lr=1e-3)
    train(train_bags, val_bags, cfg, tmp_path / "run")
    train_bags[3].features[0, 0] += 0.5  # same ids, labels and shapes; one value differs
    with pytest.warns(UserWarning, match="bags, labels or feature values"):
        resumed = train(train_bags, val_bags, cfg, tmp_path / "run", resume=True)
    fresh = train(train_bags, val_bags, cfg, tmp_path / "fresh")
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(resumed.history) == drop(fresh.history)


def test_precision_change_reencodes_and_retrains(tmp_path: Path):
    root, out, run = bag_root(tmp_path, n_bags=6), tmp_path / "out", tmp_path / "run"
    args = ("features", "extract", root, out, "--encoder", CONV_ENCODER, "--workers", "0", "--runtime", "torch")
    train_args = ("train", out, "--val", out, "--out", run, "--epochs", "2", "--min-epochs", "1")
    cli(*args, "--precision", "fp32")
    fp32 = load_feature_dataset(out)
    cli(*train_args)
    cli(*args, "--precision", "bf16")
    bf16 = load_feature_dataset(out)
    assert all(b.attrs["precision"] == "bf16" for b in bf16)
    assert not all(np.array_equal(a.features, b.features) for a, b in zip(fp32, bf16))
    assert "data changed" in " ".join(cli(*train_args).split())
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header + 2 epochs of the new run, not the old run returned as is


def test_temp_leftovers_of_killed_steps_are_removed_and_nothing_else(tmp_path: Path):
    root, out = bag_root(tmp_path, n_bags=2), tmp_path / "out"
    out.mkdir()
    ours = [out / ".b0.h5.k2j3h4k5.tmp", out / ".b9.h5.a_b0c1d2.tmp"]
    users = [out / ".notes.tmp", out / "b0.h5.tmp", out / ".b0.h5.tmp", out / ".b0.h5.short.tmp"]
    for p in ours + users:
        p.write_bytes(b"")
    extract(root, out)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in users)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.abcdefgh.tmp").write_bytes(b"x" * 1000)
    (run / "mine.pt.tmp").write_bytes(b"")
    cli("train", out, "--val", out, "--out", run, "--epochs", "1", "--min-epochs", "1")
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name) == ["mine.pt.tmp"]


def test_a_second_writer_of_one_folder_is_refused(tmp_path: Path):
    from histomil.files import exclusive_output

    root, out = bag_root(tmp_path, n_bags=2), tmp_path / "out"
    with exclusive_output(out, "features extract"):
        message = cli_error("features", "extract", root, out, "--encoder", FAST_ENCODER, "--workers", "0", "--runtime", "torch")
    assert "another histomil process is writing here" in message and str(out) in message
    extract(root, out)  # free again once the holder is done


# --- run: settings ---------------------------------------------------------------------------


def run_config(tmp_path: Path, tiles: Path | None = None, epochs: int = 2) -> Path:
    keys = ("columns", "study", "features", "train")
    cfg = {"tiles": str(tiles or example_tile_table()), **{k: TINY_CROSSVAL[k] for k in keys}}
    cfg["columns"] = {k: v for k, v in cfg["columns"].items() if k != "split"}
    cfg["train"] = {**cfg["train"], "epochs": epochs}
    cfg["features"] = {**cfg["features"], "runtime": "torch"}  # OpenVINO's graph conversion costs seconds per process
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_refuses_changed_settings_and_ignores_hardware(tmp_path: Path):
    config, out = run_config(tmp_path), tmp_path / "run"
    cli("run", config, "--out", out)
    recorded = (out / "config.json").read_text()
    message = cli_error("run", config, "--out", out, "--set", "study.train_bags=14", "--set", "train.lr=0.01")
    assert "study.train_bags, train.lr changed" in message and "use another --out" in message
    assert (out / "config.json").read_text() == recorded  # still describes the run that happened
    env = out / "environment.json"  # as if the run had started on another machine
    env.write_text(json.dumps({k: "another machine" for k in json.loads(env.read_text())}))
    cli("run", config, "--out", out, "--set", "features.batch_size=7", "--set", "train.threads=2")  # speed only
    older = json.loads((out / "config.json").read_text())
    del older["features"]["channels_last"]  # made before this key existed: it reads as its default
    (out / "config.json").write_text(json.dumps(older))
    cli("run", config, "--out", out)


def test_run_refuses_a_changed_tile_table(tmp_path: Path):
    table = tmp_path / "tiles.csv"
    text = example_tile_table().read_text()
    base = example_tile_table().parent
    lines = text.splitlines()
    header = lines[0].split(",")
    path_col = header.index("path")
    rows = [line.split(",") for line in lines[1:]]
    for r in rows:
        r[path_col] = str(base / r[path_col])
    table.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    config, out = run_config(tmp_path, tiles=table), tmp_path / "run"
    cli("run", config, "--out", out)
    label_col = header.index("tumor")
    rows[0][label_col] = "0" if rows[0][label_col] == "1" else "1"  # one corrected tile label
    table.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    message = cli_error("run", config, "--out", out)
    assert "the tile table changed" in message and "use another --out" in message


# --- kill -9, then run again -----------------------------------------------------------------


def kill_midway(args: list[str], done: Callable[[], bool], seed: int, slow: float = 0.3, limit: float = 180) -> None:
    """Start the CLI, wait until ``done()`` says it has written something, then SIGKILL it after a
    random (seeded) extra delay; the process must not have finished by itself."""
    env = {**os.environ, "SLOW_WRITES": str(slow), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not done():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() - t0 < limit, "the command wrote nothing in time"
        time.sleep(0.05)
    time.sleep(float(np.random.default_rng(seed).uniform(0, slow)))
    assert proc.poll() is None, "finished before it could be killed; slow it down"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_during_features_extract_then_rerun(tmp_path: Path):
    root, out = bag_root(tmp_path, n_bags=8), tmp_path / "out"
    args = ["features", "extract", root, out, "--encoder", FAST_ENCODER, "--precision", "fp32", "--workers", "0",
            "--runtime", "torch"]
    kill_midway(args, lambda: len(list(out.glob("*.h5"))) >= 2, seed=1)
    assert len(list(out.glob("*.h5"))) < 8
    cli(*args)
    extract(root, tmp_path / "whole")
    same_files(out, tmp_path / "whole")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_kill_during_train_then_rerun(tmp_path: Path):
    feats = tmp_path / "feats"
    for split, (bags, _) in {"train": make_bags(12, seed=1), "val": make_bags(6, seed=2, prefix="v")}.items():
        for b in bags:
            write_feature_bag(feats / split / f"{b.bag_id}.h5", b)
    run = tmp_path / "run"
    args = ["train", feats / "train", "--val", feats / "val", "--out", run, "--epochs", "6", "--min-epochs", "6",
            "--batch-size", "2"]
    history = run / "history.csv"
    kill_midway(args, lambda: history.exists() and len(history.read_text().splitlines()) >= 2, seed=2)
    cli(*args)
    cli(*args[:5], tmp_path / "whole", *args[6:])
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    strip = lambda p: [line.rsplit(",", 1)[0] for line in p.read_text().splitlines()]  # noqa: E731 - no seconds
    assert strip(history) == strip(tmp_path / "whole" / "history.csv")
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_kill_during_run_then_rerun(tmp_path: Path):
    config, out = run_config(tmp_path, epochs=4), tmp_path / "run"
    args = ["run", config, "--out", out]
    kill_midway(args, lambda: len(list((out / "features" / "train").glob("*.h5"))) >= 3, seed=3, slow=0.1)
    cli(*args)
    cli("run", config, "--out", tmp_path / "whole")
    for split in sorted(p.name for p in (out / "features").iterdir() if p.is_dir() and p.name != "cache"):
        same_files(out / "features" / split, tmp_path / "whole" / "features" / split)
    a = torch.load(out / "model" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "model" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ma = json.loads((out / "evaluation" / "metrics.json").read_text())["results"]
    mb = json.loads((tmp_path / "whole" / "evaluation" / "metrics.json").read_text())["results"]
    assert ma == mb


def test_exclusive_output_names_the_folder(tmp_path: Path):
    from histomil.files import exclusive_output

    with exclusive_output(tmp_path, "training"), pytest.raises(HistomilError, match="another histomil process"):
        with exclusive_output(tmp_path, "training"):
            pass


def test_crossval_refuses_a_changed_tile_table_and_reads_older_configs(tmp_path: Path):
    from tiny_runs import write_tiny_crossval_config

    from histomil.data.tile_table import read_tile_table
    from histomil.evaluation.protocol import load_crossval_config

    config = write_tiny_crossval_config(tmp_path / "cv.yaml")
    out = tmp_path / "cv"
    out.mkdir()
    cfg = load_crossval_config(config)
    older = json.loads(cfg.model_dump_json())
    del older["features"]["channels_last"]  # a key this folder's histomil did not have yet: its default applies
    (out / "config.json").write_text(json.dumps(older))
    c = cfg.columns
    table = read_tile_table(cfg.tiles, c.path, c.label, c.patient, c.split)
    table.labels[0] = 1 - table.labels[0]  # the folder was made before one tile label was corrected
    (out / "inputs.json").write_text(json.dumps({"tile_table_digest": table.digest()}))
    message = cli_error("crossval", config, "--out", out)
    assert "the tile table changed" in message and "use another output folder" in message
    assert not (out / "seed_0").exists()  # refused before any work


def test_crossval_refuses_changed_tile_images_under_an_unchanged_table(tmp_path: Path):
    from tiny_runs import write_tiny_crossval_config

    from histomil.data.tile_table import read_tile_table
    from histomil.evaluation.protocol import load_crossval_config

    config = write_tiny_crossval_config(tmp_path / "cv.yaml")
    out = tmp_path / "cv"
    out.mkdir()
    cfg = load_crossval_config(config)
    (out / "config.json").write_text(cfg.model_dump_json())
    c = cfg.columns
    table = read_tile_table(cfg.tiles, c.path, c.label, c.patient, c.split)
    # the folder was made when one tile held other pixels: same table, other content digest
    (out / "inputs.json").write_text(json.dumps({"tile_table_digest": table.digest(), "tile_content_digest": "0" * 64}))
    message = cli_error("crossval", config, "--out", out)
    assert "tile images changed" in message and "use another output folder" in message
    assert not (out / "seed_0").exists()  # refused before any work


def test_tile_content_digest_follows_the_tile_bytes(tmp_path: Path):
    from histomil.data.tile_table import read_tile_table

    tiles = [tmp_path / f"t{i}.jpg" for i in range(3)]
    for i, t in enumerate(tiles):
        t.write_bytes(bytes([i]) * 10)
    csv_path = tmp_path / "tiles.csv"
    csv_path.write_text("path,tumor,case_id\n" + "".join(f"{t.name},{i % 2},p{i}\n" for i, t in enumerate(tiles)))
    before = read_tile_table(csv_path)
    digest, content = before.digest(), before.content_digest()
    tiles[1].write_bytes(b"other pixels")
    after = read_tile_table(csv_path)
    assert after.digest() == digest and after.content_digest() != content


def test_train_pixels_restarts_when_a_tile_changes(tmp_path: Path):
    from histomil.data.bags import load_bag_folders
    from histomil.training.pixels import PixelTrainConfig, train_pixels

    root = bag_root(tmp_path, n_bags=6, size=2)
    cfg = PixelTrainConfig(backbone="original", finetune=None, model="gated_abmil", input_size=32, pretrained=False,
                           epochs=1, min_epochs=0, num_workers=0, model_kwargs={"embed_dim": 8, "attn_dim": 4, "dropout": 0.0})
    bags = load_bag_folders(root)
    train_pixels(bags[:4], bags[4:], cfg, tmp_path / "run")
    tile = bags[1].tile_paths[0]
    shutil.copyfile(sorted(example_tile_table().parent.rglob("*.jpg"))[50], tile)  # same name, other pixels
    with pytest.warns(UserWarning, match="data changed"):
        resumed = train_pixels(bags[:4], bags[4:], cfg, tmp_path / "run", resume=True)
    fresh = train_pixels(bags[:4], bags[4:], cfg, tmp_path / "fresh")
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(resumed.history) == drop(fresh.history)


def test_removed_bags_do_not_stay_beside_the_new_ones(tmp_path: Path):
    root, out = bag_root(tmp_path, n_bags=4), tmp_path / "out"
    extract(root, out)
    shutil.rmtree(root / "b3")
    (root / "labels.csv").write_text("case,y_true\nb0,0\nb1,1\nb2,0\n")
    message = " ".join(extract(root, out).split())
    assert "warning:" in message and "1 feature file(s) belong to no bag" in message and "b3.h5" in message
    # a study composed again with fewer bags: the study's own feature folders drop the bags it no longer has
    table, study, feats = example_tile_table(), tmp_path / "study", tmp_path / "feats"
    make = ("bags", "make", table, study, "--bag-size", "6", "--val-bags", "4", "--test-bags", "4", "--test-witnesses", "3",
            "--train-witnesses", "1-3", "--val-witnesses", "1-3")
    study_extract = ("features", "extract", study, feats, "--encoder", FAST_ENCODER, "--precision", "fp32",
                     "--workers", "0", "--runtime", "torch")
    cli(*make, "--train-bags", "8")
    cli(*study_extract)
    cli(*make, "--train-bags", "5", "--overwrite")
    cli(*study_extract)
    assert sorted(p.name for p in (feats / "train").glob("*.h5")) == [f"{i}.h5" for i in range(5)]


def test_changed_since_record_names_changes_skips_resumable_and_refuses_unreadable(tmp_path: Path):
    from pydantic import BaseModel

    from histomil.config import changed_since_record

    class Inner(BaseModel):
        batch_size: int = 64
        encoder: str = "a"

    class Cfg(BaseModel):
        seeds: list[int] = [0]
        features: Inner = Inner()

    record = tmp_path / "config.json"
    now = {"seeds": [0, 1], "features": {"batch_size": 8, "encoder": "b"}}
    assert changed_since_record(record, Cfg, now, {("seeds",)}, "{path}: bad") == []  # nothing recorded yet
    record.write_text(json.dumps({"seeds": [0], "features": {"batch_size": 64, "encoder": "a"}}))
    assert changed_since_record(record, Cfg, now, {("seeds",), ("features", "batch_size")}, "{path}: bad") == [("features", "encoder")]
    assert changed_since_record(record, Cfg, now, set(), "{path}: bad") == [("features", "batch_size"), ("features", "encoder"), ("seeds",)]
    record.write_text("[1, 2]")
    with pytest.raises(HistomilError, match=r"config\.json: unreadable \(not a mapping\)"):
        changed_since_record(record, Cfg, now, set(), "{path}: unreadable ({exc})")

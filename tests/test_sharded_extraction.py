"""Sharded extraction (``--shard I/N`` and torchrun) writes what one process writes.

The bag folders are made from a few real EBHI tiles; the encoder is EfficientNet-Lite0 in fp32 on the
CPU, so the shards' features must equal the single run's within 1e-5 (batches differ between runs).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histomil.cli import app
from histomil.errors import HistomilError
from histomil.features import shards
from histomil.features.formats import load_features_folder
from histomil.features.shards import Shard, choose_shard, parse_shard
from histomil.features.store import read_feature_bag
from torchrun_cli import torchrun

EBHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ebhi"
runner = CliRunner()
N_BAGS, TILES = 5, 3
COMMON = ["--precision", "fp32", "--runtime", "torch", "--batch-size", "4", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def bag_root(tmp_path_factory) -> Path:
    """5 bag folders of 3 tiles (bag b1 shares a tile with b0) and a labels.csv."""
    if not (EBHI / "tiles.csv").is_file():
        pytest.skip("the EBHI tiles are not beside the checkout")
    with open(EBHI / "tiles.csv") as fh:
        rows = list(csv.DictReader(fh))
    tiles = [r for r in rows if r["tumor"] == "1"][:8] + [r for r in rows if r["tumor"] == "0"][:8]
    root = tmp_path_factory.mktemp("bags")
    labels = ["case,y_true"]
    for i in range(N_BAGS):
        bag = root / f"b{i}"
        bag.mkdir()
        for j in range(TILES):
            row = tiles[(3 * i + j - (1 if i == 1 and j == 0 else 0)) % len(tiles)]
            (bag / f"t{j}.jpg").symlink_to(EBHI / row["path"])
        labels.append(f"b{i},{i % 2}")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    return root


def extract(*args: str) -> None:
    result = runner.invoke(app, ["features", "extract", *args, *COMMON])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def single_run(bag_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "features"
    extract(str(bag_root), str(out))
    return out


def listing(folder: Path) -> list[str]:
    """What a reader sees of a feature folder: its files, without the tile cache and lock files."""
    return sorted(p.name for p in folder.iterdir() if p.name not in ("cache", shards.PARTS_DIR) and not p.name.startswith(".histomil"))


def assert_same_features(a: Path, b: Path) -> None:
    assert listing(a) == listing(b)
    for name in listing(a):
        if name.endswith(".h5"):
            fa, fb = read_feature_bag(a / name), read_feature_bag(b / name)
            assert fa.tile_paths == fb.tile_paths and fa.label == fb.label
            np.testing.assert_allclose(fa.features, fb.features, rtol=0, atol=1e-5)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_parse_and_choose_shard():
    assert parse_shard("1/4") == Shard(1, 4)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(HistomilError, match="--shard"):
            parse_shard(bad)
    assert choose_shard(None, 0, 1) is None
    assert choose_shard(None, 1, 3) == Shard(1, 3)
    assert choose_shard("2/5", 0, 1) == Shard(2, 5)
    with pytest.raises(HistomilError, match="under torchrun"):
        choose_shard("0/2", 0, 2)


def test_shards_split_the_sorted_items_disjointly():
    items = [f"b{i}" for i in range(11)]
    parts = [Shard(i, 3).take(list(reversed(items))) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(items)
    assert parts[0] == ["b0", "b2", "b5", "b8"]  # positions 0, 3, 6, 9 of the sorted names b0 b1 b10 b2 ...


def test_two_shards_equal_one_run_and_readers_wait_for_both(bag_root, single_run, tmp_path):
    out = tmp_path / "features"
    extract(str(bag_root), str(out), "--shard", "1/2")
    assert sorted(p.name for p in out.glob("*.h5")) == ["b1.h5", "b3.h5"]
    assert not (out / "labels.csv").exists()  # the index waits for every shard
    with pytest.raises(HistomilError, match=r"incomplete sharded extraction \(shard\(s\) 0/2 not finished\)"):
        load_features_folder(out)
    result = runner.invoke(app, ["train", str(out), "--val", str(out), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "shard(s) 0/2 not finished" in result.output
    extract(str(bag_root), str(out), "--shard", "0/2")
    assert_same_features(out, single_run)
    assert [b.bag_id for b in load_features_folder(out)] == [f"b{i}" for i in range(N_BAGS)]


def test_a_dead_shard_is_resumed_by_rerunning_it(bag_root, single_run, tmp_path):
    out = tmp_path / "features"
    extract(str(bag_root), str(out), "--shard", "0/2")
    extract(str(bag_root), str(out), "--shard", "1/2")
    (out / "b2.h5").unlink()  # shard 0 'died' before writing b2 in a new run ...
    shards.begin(out, Shard(0, 2))
    with pytest.raises(HistomilError, match="0/2 not finished"):
        load_features_folder(out)
    result = runner.invoke(app, ["features", "extract", str(bag_root), str(out), "--shard", "0/2", *COMMON])
    assert result.exit_code == 0, result.output
    assert "shard 0/2: b" in result.output and "(1 written, 2 already done)" in result.output
    assert_same_features(out, single_run)
    # a single run over a sharded folder keeps every file and forgets the shards
    extract(str(bag_root), str(out))
    assert not (out / shards.PARTS_DIR).exists()
    assert_same_features(out, single_run)


def test_merge_runs_once_every_part_is_there(tmp_path):
    calls = []
    shards.begin(tmp_path, Shard(0, 2))
    shards.begin(tmp_path, Shard(1, 2))
    shards.finish(tmp_path, Shard(1, 2), ["b1"])
    assert not shards.merge_when_complete(tmp_path, calls.append) and calls == []
    shards.finish(tmp_path, Shard(0, 2), ["b0", "b2"])
    assert shards.merge_when_complete(tmp_path, calls.append) and calls == [["b0", "b2", "b1"]]
    shards.begin(tmp_path, Shard(2, 3))  # another sharding supersedes: parts of N=2 go
    assert shards.missing_shards(tmp_path) == (-1, [])
    shards.finish(tmp_path, Shard(2, 3), ["x"])
    assert shards.missing_shards(tmp_path) == (3, [0, 1])


def test_torchrun_two_processes_equal_one_run(bag_root, single_run, tmp_path):
    out = tmp_path / "features"
    done = torchrun(["features", "extract", bag_root, out, *COMMON])
    assert "shard 0/2" in done.stdout + done.stderr and "shard 1/2" in done.stdout + done.stderr
    assert_same_features(out, single_run)
    parts = sorted(p.name for p in (out / shards.PARTS_DIR).glob("part-*.json"))
    assert parts == ["part-0-of-2.json", "part-1-of-2.json"]
    assert json.loads((out / shards.PARTS_DIR / parts[1]).read_text())["items"] == ["b1", "b3"]


def test_slide_shards_equal_one_run_and_the_last_writes_the_export(tmp_path):
    wsi = EBHI.parent / "wsi"
    if not wsi.is_dir():
        pytest.skip("the example slides are not beside the checkout")
    opts = ["--mpp", "2", "--tile-size", "112", "--slide-mpp", "0.5", "--slide-magnification", "20",
            "--layout", "trident", "--precision", "fp32", "--runtime", "torch", "--workers", "0", "--device", "cpu"]

    def slides(out: Path, *extra: str) -> str:
        result = runner.invoke(app, ["features", "slides", str(wsi), "--out", str(out), *opts, *extra])
        assert result.exit_code == 0, result.output
        return result.output

    slides(tmp_path / "one")
    first = slides(tmp_path / "sharded", "--shard", "1/2")
    assert "shard 1/2: 1 slides encoded" in first
    assert not (tmp_path / "sharded" / "features_efficientnet_lite0").exists()  # the export waits for shard 0
    slides(tmp_path / "sharded", "--shard", "0/2")
    for sub in ("histomil", "features_efficientnet_lite0"):
        one, sharded = tmp_path / "one" / sub, tmp_path / "sharded" / sub
        assert listing(one) == listing(sharded) and len(listing(one)) == 2
        for name in listing(one):
            np.testing.assert_allclose(read_any(one / name), read_any(sharded / name), rtol=0, atol=1e-5)


def read_any(path: Path) -> np.ndarray:
    """The feature matrix of a histomil or TRIDENT file."""
    from histomil.features.formats import load_any_features

    return np.asarray(load_any_features(path).features)

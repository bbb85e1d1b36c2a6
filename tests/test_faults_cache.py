"""Faults around reuse: a tile-feature cache shared by concurrent writers, and predict's work folder
reused across different image folders whose bag ids repeat (issue 12, items 1 and 2)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histomil.errors import HistomilError
from histomil.features.cache import FeatureCache
from histomil.features.extract import tile_digests
from histomil.features.formats import load_feature_dataset

INFO = {"name": "toy", "input_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "dim": 4, "precision": "fp32"}


def _rows(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 4), value, np.float32)


# ------------------------------------------------------------------------------- the cache, in-process


def test_two_writers_opened_together_keep_both_shards(tmp_path: Path) -> None:
    first, second = FeatureCache(tmp_path, INFO), FeatureCache(tmp_path, INFO)  # both see an empty cache
    first.add(["a", "b"], np.concatenate([_rows(1), _rows(2)]))
    second.add(["c"], _rows(3))
    shards = sorted(first.root.glob("shard-*.h5"))
    assert len(shards) == 2  # per-process counters named both shard-00000.h5: one replaced the other
    reader = FeatureCache(tmp_path, INFO)
    assert len(reader) == 3
    np.testing.assert_array_equal(reader.get_many(["c", "a", "b"])[:, 0], [3, 1, 2])


def test_a_reader_sees_shards_published_after_it_opened(tmp_path: Path) -> None:
    reader = FeatureCache(tmp_path, INFO)
    FeatureCache(tmp_path, INFO).add(["late"], _rows(7))  # another process publishes afterwards
    assert reader.missing(["late", "never"]) == ["never"]
    np.testing.assert_array_equal(reader.get_many(["late"]), _rows(7))
    with pytest.raises(KeyError):
        reader.get_many(["never"])
    FeatureCache(tmp_path, INFO).add(["later"], _rows(8))
    assert "later" in reader and "nowhere" not in reader


def test_old_numbered_shards_stay_readable(tmp_path: Path) -> None:
    import h5py

    root = FeatureCache(tmp_path, INFO).root
    for number, (keys, value) in enumerate([(["k0", "k1"], 1.0), (["k2"], 2.0)]):  # the layout before unique names
        with h5py.File(root / f"shard-{number:05d}.h5", "w") as f:
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("features", data=_rows(value, len(keys)))
    cache = FeatureCache(tmp_path, INFO)
    assert len(cache) == 3
    cache.add(["k3"], _rows(3))
    assert (root / "shard-00000.h5").is_file() and (root / "shard-00001.h5").is_file()  # never overwritten
    np.testing.assert_array_equal(FeatureCache(tmp_path, INFO).get_many(["k3", "k2", "k0"])[:, 0], [3, 2, 1])


def test_encoder_json_is_created_once_and_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first writers: the one that loses the race to create encoder.json compares, never overwrites."""
    real_link = os.link
    other = {**INFO, "precision": "bf16"}

    def rival_first(src: str | Path, dst: str | Path) -> None:
        Path(dst).write_text(json.dumps(other))  # the rival created it in between
        real_link(src, dst)

    monkeypatch.setattr(os, "link", rival_first)
    with pytest.raises(HistomilError, match="different encoder configuration"):
        FeatureCache(tmp_path, INFO)
    meta = next(tmp_path.glob("toy-*/encoder.json"))
    assert json.loads(meta.read_text()) == other  # the first one stays
    assert [p.name for p in meta.parent.iterdir()] == ["encoder.json"]  # no temporary file left


def test_unreadable_encoder_json_is_one_line(tmp_path: Path) -> None:
    root = FeatureCache(tmp_path, INFO).root
    (root / "encoder.json").write_text("{half")
    with pytest.raises(HistomilError, match="encoder.json: unreadable"):
        FeatureCache(tmp_path, INFO)


# ------------------------------------------------------------------- two real extraction processes


def _bag_sets(shared_data: Path, root: Path) -> tuple[Path, Path]:
    """Two bag folders of real EBHI tiles, 3 bags of 8 each, sharing 16 of their 24 tiles."""
    tiles = sorted((shared_data / "ebhi" / "tiles" / "Polyp").glob("*.jpg"))[:32]
    sets = {"A": tiles[:24], "B": tiles[8:32]}
    for name, chosen in sets.items():
        for i in range(3):
            bag = root / name / f"case{i}"
            bag.mkdir(parents=True)
            for tile in chosen[i * 8 : (i + 1) * 8]:
                shutil.copyfile(tile, bag / tile.name)
    return root / "A", root / "B"


def _extract_args(source: Path, out: Path, cache: Path) -> list[str]:
    """fp32 torch, one tile per encoder batch: a tile's fp32 features differ in the last bits between
    batch sizes (8e-6 between 24 and 8 here), and which tiles a run still has to encode depends on timing."""
    return ["features", "extract", str(source), str(out), "--cache", str(cache),
            "--precision", "fp32", "--runtime", "torch", "--workers", "0", "--batch-size", "1"]


def test_concurrent_extractions_on_one_cache_equal_serial_runs(shared_data: Path, tmp_path: Path) -> None:
    a, b = _bag_sets(shared_data, tmp_path / "bags")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # serial: A then B on one cache, in one process (one interpreter start), run beside the pair below
    serial = tmp_path / "serial"
    driver = (
        "from histomil.cli import app\n"
        f"for args in {[_extract_args(a, serial / 'A', serial / 'cache'), _extract_args(b, serial / 'B', serial / 'cache')]!r}:\n"
        "    app(args, standalone_mode=False)\n"
    )
    # concurrent: the real CLI twice, started together on one cache
    conc = tmp_path / "concurrent"
    cli = [sys.executable, "-m", "histomil.cli"]
    commands = [[sys.executable, "-c", driver]] + [cli + _extract_args(src, conc / src.name, conc / "cache") for src in (a, b)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    for name in ("A", "B"):
        got = {bag.bag_id: bag for bag in load_feature_dataset(conc / name)}
        want = {bag.bag_id: bag for bag in load_feature_dataset(serial / name)}
        assert sorted(got) == sorted(want) == ["case0", "case1", "case2"]
        for bag_id, bag in want.items():
            assert got[bag_id].tile_paths == bag.tile_paths
            np.testing.assert_array_equal(got[bag_id].features, bag.features)  # exact, fp32
    # every tile of both runs is in the shared cache, with the features the serial runs computed
    digests = tile_digests(sorted(a.rglob("*.jpg")) + sorted(b.rglob("*.jpg")))
    keys = sorted(set(digests.values()))
    assert len(keys) == 32
    (cache_dir,) = (conc / "cache").iterdir()
    (serial_dir,) = (serial / "cache").iterdir()
    assert cache_dir.name == serial_dir.name
    info = json.loads((cache_dir / "encoder.json").read_text())
    shared, reference = FeatureCache(conc / "cache", info), FeatureCache(serial / "cache", info)
    assert shared.missing(keys) == []
    np.testing.assert_array_equal(shared.get_many(keys), reference.get_many(keys))


# ------------------------------------------------------------ predict's work folder, keyed by content


def _image_bags(shared_data: Path, root: Path, spec: dict[str, tuple[str, slice]]) -> Path:
    """Bag folders ``root/<bag id>`` of real EBHI tiles: bag id -> (tissue class, which of its tiles)."""
    for bag_id, (tissue, chosen) in spec.items():
        (root / bag_id).mkdir(parents=True)
        for tile in sorted((shared_data / "ebhi" / "tiles" / tissue).glob("*.jpg"))[chosen]:
            shutil.copyfile(tile, root / bag_id / tile.name)
    return root


@pytest.mark.usefixtures("fast_encoder", "one_thread")
def test_predict_never_returns_another_folders_bags(shared_data: Path, tmp_path: Path) -> None:
    from tiny_runs import colour_stats_encoder

    from histomil.evaluation.predict import predict_source
    from histomil.models.registry import build_model
    from histomil.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    kwargs = {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}
    encoder_info = colour_stats_encoder().feature_attrs()
    model = save_checkpoint(tmp_path / "model.pt", build_model("gated_abmil", in_dim=96, **kwargs), "gated_abmil",
                            kwargs, 2, encoder_info, None)
    # the same bag ids, other tiles and other answers: A's bag 0 is a polyp, B's is normal mucosa
    a = _image_bags(shared_data, tmp_path / "A", {"0": ("Polyp", slice(0, 4)), "1": ("Normal", slice(0, 4)),
                                                    "2": ("Adenocarcinoma", slice(0, 4))})
    b = _image_bags(shared_data, tmp_path / "B", {"0": ("Normal", slice(4, 9)), "1": ("Adenocarcinoma", slice(4, 8))})

    def rows(source: Path, out_csv: Path) -> list[dict]:
        predict_source(model, source, out_csv, top_k=2, precision="fp32")
        return list(csv.DictReader(open(out_csv)))

    from_a = rows(a, tmp_path / "out" / "pred.csv")
    from_b = rows(b, tmp_path / "out" / "pred.csv")  # the same CSV, so the same work folder
    alone = rows(b, tmp_path / "fresh" / "pred.csv")
    assert [r["bag_id"] for r in from_b] == ["0", "1"]  # A's bag 2 is not B's
    assert from_b == alone
    assert [r["n_tiles"] for r in from_b] == ["5", "4"]
    assert all(t in {p.name for p in (b / r["bag_id"]).iterdir()} for r in from_b for t in r["top_tiles"].split(";"))
    assert from_a[0]["prob_positive"] != from_b[0]["prob_positive"]  # the check can tell the folders apart
    assert [p.name for p in (tmp_path / "out" / ".pred-work" / "features").iterdir()] == [
        p.name for p in (tmp_path / "fresh" / ".pred-work" / "features").iterdir()]  # A's features were removed
    assert rows(a, tmp_path / "out" / "pred.csv") == from_a  # and back again


def test_a_killed_writers_temporary_shard_is_removed_once_stale(tmp_path: Path) -> None:
    from histomil.features.cache import STALE_TEMP_S
    from histomil.files import atomic_path

    root = FeatureCache(tmp_path, INFO).root
    killed, live = atomic_path(root / "shard-0001-1-aa.h5"), atomic_path(root / "shard-0002-2-bb.h5")
    killed.write_bytes(b"half a shard")
    live.write_bytes(b"being written")
    old = killed.stat().st_mtime - STALE_TEMP_S - 60
    os.utime(killed, (old, old))
    cache = FeatureCache(tmp_path, INFO)
    assert not killed.exists() and live.exists()  # a live writer's file is never taken away
    assert len(cache) == 0  # temporary files are never read as shards

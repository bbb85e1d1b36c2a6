"""Feature files and the content-keyed tile cache."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from histomil.errors import HistomilError
from histomil.features.cache import FeatureCache
from histomil.features.formats import load_feature_dataset
from histomil.features.store import FeatureBag, pad_batch, read_feature_bag, write_feature_bag
from histomil.files import atomic_write

INFO = {"name": "toy", "input_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "dim": 4, "precision": "fp32"}


def test_feature_bag_round_trip_is_self_describing(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    bag = FeatureBag("7", feats, ["a.jpg", "b.jpg", "c.jpg"], label=1, attrs={"encoder": "toy", "input_size": 8})
    write_feature_bag(tmp_path / "7.h5", bag)
    assert [p.name for p in tmp_path.iterdir()] == ["7.h5"]  # no temporary file left behind
    with h5py.File(tmp_path / "7.h5") as f:
        assert f["features"].attrs["encoder"] == "toy"
        assert f.attrs["input_size"] == 8
    back = read_feature_bag(tmp_path / "7.h5")
    assert back.bag_id == "7" and back.label == 1 and back.tile_paths == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_array_equal(back.features, feats)
    unlabelled = FeatureBag("8", feats, ["a", "b", "c"], label=None)
    write_feature_bag(tmp_path / "8.h5", unlabelled)
    assert read_feature_bag(tmp_path / "8.h5").label is None
    with pytest.raises(HistomilError, match="have no label"):
        load_feature_dataset(tmp_path, require_labels=True)


def test_unreadable_feature_file_names_the_file(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(HistomilError, match="x.h5"):
        read_feature_bag(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HistomilError, match="no feature files"):
        load_feature_dataset(empty)


def test_pad_batch_masks_padding():
    x, mask = pad_batch([np.ones((2, 3), np.float32), np.full((4, 3), 2, np.float32)])
    assert x.shape == (2, 4, 3)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert float(x[0, 2:].abs().sum()) == 0.0


def test_cache_persists_and_resumes(tmp_path):
    cache = FeatureCache(tmp_path, INFO)
    cache.add(["k1", "k2"], np.array([[1, 1, 1, 1], [2, 2, 2, 2]], np.float32))
    assert cache.missing(["k1", "k3", "k3", "k2", "k4"]) == ["k3", "k4"]
    again = FeatureCache(tmp_path, INFO)  # a new process sees the shards written before
    assert len(again) == 2
    again.add(["k3"], np.full((1, 4), 3, np.float32))
    np.testing.assert_array_equal(again.get_many(["k3", "k1"])[:, 0], [3, 1])
    with pytest.raises(KeyError):
        again.get_many(["nope"])


def test_cache_separates_encoder_configurations(tmp_path):
    FeatureCache(tmp_path, INFO).add(["k1"], np.ones((1, 4), np.float32))
    other = FeatureCache(tmp_path, {**INFO, "precision": "bf16"})
    assert "k1" not in other  # bf16 features never mix with fp32 ones
    meta = next(tmp_path.glob("toy-*/encoder.json"))
    meta.write_text('{"name": "something else"}')
    with pytest.raises(HistomilError, match="different encoder"):
        FeatureCache(tmp_path, INFO)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path, error):
    final = tmp_path / "out.txt"
    with atomic_write(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final and not final.exists()
        tmp.write_text("first")
    assert final.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(error):
        with atomic_write(final) as tmp:
            tmp.write_text("half")
            raise error()
    assert final.read_text() == "first"  # untouched, and the temporary file is gone
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]

"""Decoding for feature extraction: batches in order, bad tiles reported, any number of threads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histomil.features.extract import decoded_batches


@pytest.fixture()
def tiles(tmp_path):
    items = []
    for i in range(23):
        path = tmp_path / f"t{i}.png"
        size = 32 if i % 5 else 48  # every fifth tile has another size and must be resized
        Image.fromarray(np.full((size, size, 3), i, dtype=np.uint8)).save(path)
        items.append((f"k{i}", str(path)))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    items.insert(7, ("bad", str(tmp_path / "bad.jpg")))
    return items


@pytest.mark.parametrize("workers", [0, 1, 3, 8])
def test_decoded_batches_keep_order_resize_and_report_bad_tiles(tiles, workers):
    batches = list(decoded_batches(tiles, 32, batch_size=5, workers=workers))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4]
    flat = [t for b in batches for t in b]
    assert [k for k, _, _ in flat] == [k for k, _ in tiles]
    for key, rgb, err in flat:
        if key == "bad":
            assert rgb is None and "bad.jpg" in err
        else:
            assert err is None and rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
            assert int(rgb[16, 16, 0]) == int(key[1:])  # the right tile in the right place


def test_decoded_batches_of_nothing():
    assert list(decoded_batches([], 32, batch_size=4, workers=2)) == []

"""Bag folders, manifests and label CSVs built in tmp_path from real EBHI tiles."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from histomil.data.bags import (
    Bag,
    check_bags,
    load_bag_folders,
    load_bags,
    load_manifest,
    read_labels_csv,
    read_tile_truth,
)
from histomil.files import natural_key
from histomil.errors import BadTileError, HistomilError


@pytest.fixture(scope="module")
def ebhi_rows(ebhi_table: Path) -> list[dict]:
    with open(ebhi_table, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiles(ebhi_rows, shared_data) -> list[Path]:
    """Six real JPEG tiles."""
    return [shared_data / "ebhi" / r["path"] for r in ebhi_rows[:6]]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _make_root(tmp_path: Path, tiles: list[Path], layout: dict[str, list[str]], labels: dict[str, int] | None,
               csv_name: str = "labels.csv") -> Path:
    """root/<case>/<name> copies of real tiles, plus a labels CSV (rows in reverse order)."""
    root = tmp_path / "bags"
    k = 0
    for case, names in layout.items():
        (root / case).mkdir(parents=True)
        for name in names:
            shutil.copy(tiles[k % len(tiles)], root / case / name)
            k += 1
    if labels is not None:
        _write_csv(root / csv_name, ["case", "y_true"], [[c, y] for c, y in reversed(list(labels.items()))])
    return root


LAYOUT = {"10": ["t1.jpg", "t2.jpg", "t3.jpg"], "2": ["tile10.jpg", "tile9.JPG"], "1": ["a.png"]}
LABELS = {"1": 0, "2": 1, "10": 0}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(HistomilError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------- folders


def test_folders_numeric_order_natural_tiles_and_labels(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, LABELS)
    bags = load_bag_folders(root)
    assert [b.bag_id for b in bags] == ["1", "2", "10"]
    assert [b.label for b in bags] == [0, 1, 0]
    assert [len(b) for b in bags] == [1, 2, 3]
    assert [p.name for p in bags[1].tile_paths] == ["tile9.JPG", "tile10.jpg"]
    assert all(p.is_file() and p.parent.name == b.bag_id for b in bags for p in b.tile_paths)
    assert isinstance(bags[0], Bag) and isinstance(bags[0].tile_paths, tuple)
    assert load_bags(root) == bags


def test_labels_joined_to_the_right_bags_on_real_cases(tmp_path, ebhi_rows, shared_data):
    """Bags made from real EBHI cases: each bag's label must be the tumour status of its own tiles."""
    by_case: dict[str, list[dict]] = {}
    for r in ebhi_rows:
        if r["tumor"] in ("0", "1"):
            by_case.setdefault(r["case_id"], []).append(r)
    cases = [c for c in by_case if len({r["tumor"] for r in by_case[c]}) == 1]
    positive = [c for c in cases if by_case[c][0]["tumor"] == "1"]
    negative = [c for c in cases if by_case[c][0]["tumor"] == "0"]
    chosen = positive[:3] + negative[:3]
    root = tmp_path / "ebhi_bags"
    origin = {}
    for case in chosen:
        (root / case).mkdir(parents=True)
        for r in by_case[case][:4]:
            src = shared_data / "ebhi" / r["path"]
            shutil.copy(src, root / case / src.name)
            origin[src.name] = r
    rows = [[c, by_case[c][0]["tumor"]] for c in sorted(chosen, reverse=True)]
    _write_csv(root / "labels.csv", ["case", "y_true"], rows)
    bags = load_bag_folders(root)
    assert sorted(b.bag_id for b in bags) == sorted(chosen)
    assert sum(b.label for b in bags) == 3
    for bag in bags:
        for tile in bag.tile_paths:
            assert origin[tile.name]["case_id"] == bag.bag_id
            assert int(origin[tile.name]["tumor"]) == bag.label


def test_df_csv_fallback_and_precedence(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, LABELS, csv_name="df.csv")
    assert [b.label for b in load_bag_folders(root)] == [0, 1, 0]
    _write_csv(root / "labels.csv", ["case", "y_true"], [["1", 1], ["2", 0], ["10", 1]])
    assert [b.label for b in load_bag_folders(root)] == [1, 0, 1]  # labels.csv wins over df.csv
    other = _write_csv(tmp_path / "elsewhere.csv", ["Case", " y_true "], [["10", 1], ["2", 1], ["1", 1]])
    assert [b.label for b in load_bag_folders(root, labels_csv=other)] == [1, 1, 1]


def test_extra_columns_and_index_column_are_fine(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, None)
    rows = [[0, "1", 1, "x"], [1, "2", 0, ""], [2, "10", 1, "y"]]
    _write_csv(root / "df.csv", ["", "case", "y_true", "note"], rows)
    assert [b.label for b in load_bag_folders(root)] == [1, 0, 1]


def test_unlabelled_bags_for_prediction(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, None)
    message = _error(load_bag_folders, root)
    assert str(root) in message and "labels.csv" in message and "df.csv" in message
    bags = load_bag_folders(root, require_labels=False)
    assert [(b.bag_id, b.label) for b in bags] == [("1", None), ("2", None), ("10", None)]
    _write_csv(root / "labels.csv", ["case", "y_true"], [["2", 1]])
    assert [b.label for b in load_bag_folders(root, require_labels=False)] == [None, 1, None]
    assert "2 bag folder(s)" in _error(load_bag_folders, root)


def test_labels_csv_errors(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, None)
    cases = [
        ([["case", "label"], ["1", "0"]], "no 'y_true' column"),
        ([["id", "y_true"], ["1", "0"]], "no 'case' column"),
        ([["case", "y_true"]], "no rows"),
        ([["case", "y_true"], ["1", "0"], ["2", "2"], ["10", "1"]], "case 2 has label '2'"),
        ([["case", "y_true"], ["1", "0"], ["2", "1.0"], ["10", "1"]], "case 2 has label '1.0'"),
        ([["case", "y_true"], ["1", "0"], ["2", ""], ["10", "1"]], "case 2 has no label"),
        ([["case", "y_true"], ["1", "0"], ["2", "1"], ["1", "1"], ["10", "1"]],
         "line 4: case 1 appears more than once"),
    ]
    for i, (rows, expected) in enumerate(cases):
        path = _write_csv(tmp_path / f"labels{i}.csv", rows[0], rows[1:])
        message = _error(load_bag_folders, root, labels_csv=path)
        assert str(path) in message and expected in message, message
        assert expected in _error(read_labels_csv, path)
    (tmp_path / "empty.csv").write_text("")
    assert "empty" in _error(read_labels_csv, tmp_path / "empty.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81case")
    assert "binary.csv" in _error(read_labels_csv, tmp_path / "binary.csv")
    assert "not found" in _error(load_bag_folders, root, labels_csv=tmp_path / "missing.csv")


def test_case_folder_mismatches_are_named(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, {**LABELS, **{str(c): 1 for c in range(100, 107)}})
    message = _error(load_bag_folders, root)
    assert "7 case(s) have no bag folder" in message and "100, 101, 102, 103, 104 and 2 more" in message
    assert str(root / "labels.csv") in message
    (root / "labels.csv").unlink()
    _write_csv(root / "labels.csv", ["case", "y_true"], [["1", 0], ["10", 1]])
    message = _error(load_bag_folders, root)
    assert "1 bag folder(s)" in message and message.endswith(": 2")


def test_empty_bag_and_bad_root(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, LABELS)
    (root / "2" / "tile9.JPG").unlink()
    (root / "2" / "tile10.jpg").unlink()
    (root / "2" / ".DS_Store").write_bytes(b"\0")
    message = _error(load_bag_folders, root)
    assert str(root / "2") in message and "no tiles" in message
    assert "not found" in _error(load_bag_folders, tmp_path / "nowhere")
    assert "not a folder" in _error(load_bag_folders, root / "labels.csv")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(tiles[0], flat / "x.jpg")
    assert "1 image files directly" in _error(load_bag_folders, flat, require_labels=False)


def test_stray_files_error_or_skip(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, LABELS)
    (root / "2" / ".DS_Store").write_bytes(b"\0\1")
    (root / "2" / "Thumbs.db").write_bytes(b"\0\1")
    (root / ".hidden_folder").mkdir()
    assert len(load_bag_folders(root)[1].tile_paths) == 2  # hidden and system files ignored silently
    (root / "10" / "notes.txt").write_text("scanner settings")
    (root / "10" / "nested").mkdir()
    message = _error(load_bag_folders, root)
    assert str(root / "10" / "nested") in message and "sub-folder" in message  # first in name order
    logged: list[str] = []
    bags = load_bag_folders(root, on_bad_tile="skip", log=logged.append)
    assert [p.name for p in bags[2].tile_paths] == ["t1.jpg", "t2.jpg", "t3.jpg"]
    assert len(logged) == 2 and any("notes.txt" in m for m in logged) and any("nested" in m for m in logged)
    assert "on_bad_tile" in _error(load_bag_folders, root, on_bad_tile="ignore")
    assert "on_bad_tile" in _error(check_bags, bags, on_bad_tile="warn")


# ----------------------------------------------------------------------------------- check_bags


def test_check_bags_error_and_skip(tmp_path, tiles):
    root = _make_root(tmp_path, tiles, LAYOUT, LABELS)
    bags = load_bag_folders(root)
    seen: list[tuple[int, int]] = []
    assert check_bags(bags, progress=lambda d, t: seen.append((d, t))) == bags
    assert seen[-1] == (6, 6) and len(seen) == 6
    bad = root / "10" / "t2.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadTileError) as info:
        check_bags(bags)
    assert str(bad) in str(info.value) and "truncated" in str(info.value)
    logged: list[str] = []
    checked = check_bags(bags, on_bad_tile="skip", log=logged.append)
    assert [p.name for p in checked[2].tile_paths] == ["t1.jpg", "t3.jpg"]
    assert checked[2].label == 0 and checked[:2] == bags[:2]
    assert len(logged) == 1 and str(bad) in logged[0]
    (root / "1" / "a.png").write_text("not an image")
    message = _error(check_bags, bags, on_bad_tile="skip", log=logged.append)
    assert "bag 1" in message and "a.png" in message


# ------------------------------------------------------------------------------------- manifests


def test_manifest_paths_order_and_labels(tmp_path, tiles):
    data = tmp_path / "data"
    data.mkdir()
    for i, tile in enumerate(tiles[:4]):
        shutil.copy(tile, data / f"img{i}.jpg")
    absolute = tmp_path / "abs.jpg"
    shutil.copy(tiles[4], absolute)
    manifest = _write_csv(tmp_path / "manifest.csv", ["bag_id", "path", "tile_label", "label"], [
        ["10", "data/img3.jpg", "1", "1"], ["10", "data/img0.jpg", "", "1"],
        ["9", "data/img1.jpg", "0", "0"], ["9", str(absolute), "0", "0"], ["9", "data/img2.jpg", "", "0"]])
    bags = load_manifest(manifest)
    assert [(b.bag_id, b.label) for b in bags] == [("9", 0), ("10", 1)]
    assert bags[0].tile_paths == (data / "img1.jpg", absolute, data / "img2.jpg")  # manifest order kept
    assert bags[1].tile_paths == (data / "img3.jpg", data / "img0.jpg")
    assert load_bags(manifest) == bags
    assert read_tile_truth(manifest) == {("10", "data/img3.jpg"): 1, ("9", "data/img1.jpg"): 0, ("9", str(absolute)): 0}

    labels = _write_csv(tmp_path / "labels.csv", ["case", "y_true"], [["9", 0], ["10", 1]])
    plain = _write_csv(tmp_path / "plain.csv", ["bag_id", "path"], [["10", "data/img3.jpg"], ["9", "data/img1.jpg"]])
    assert [(b.bag_id, b.label) for b in load_manifest(plain)] == [("9", None), ("10", None)]
    assert [(b.bag_id, b.label) for b in load_manifest(plain, labels_csv=labels)] == [("9", 0), ("10", 1)]
    assert "2 bag(s) have no label" in _error(load_manifest, plain, require_labels=True)
    flipped = _write_csv(tmp_path / "flipped.csv", ["case", "y_true"], [["9", 1], ["10", 1]])
    assert "bag 9 has label 0" in _error(load_manifest, manifest, labels_csv=flipped)
    extra = _write_csv(tmp_path / "extra.csv", ["case", "y_true"], [["9", 0], ["10", 1], ["11", 0]])
    assert "no bag in" in _error(load_manifest, plain, labels_csv=extra)


def test_manifest_errors_and_skip(tmp_path, tiles):
    shutil.copy(tiles[0], tmp_path / "a.jpg")
    shutil.copy(tiles[1], tmp_path / "b.jpg")
    mixed = _write_csv(tmp_path / "mixed.csv", ["bag_id", "path", "label"], [["1", "a.jpg", "0"], ["1", "b.jpg", "1"]])
    assert "bag 1 has differing labels" in _error(load_manifest, mixed)
    twice = _write_csv(tmp_path / "twice.csv", ["bag_id", "path"], [["1", "a.jpg"], ["1", "./a.jpg"]])
    assert "listed twice" in _error(load_manifest, twice)
    nopath = _write_csv(tmp_path / "nopath.csv", ["bag_id", "file"], [["1", "a.jpg"]])
    assert "no 'path' column" in _error(load_manifest, nopath)
    missing = _write_csv(tmp_path / "missing.csv", ["bag_id", "path"],
                         [["1", "a.jpg"], ["1", "gone.jpg"], ["2", "b.jpg"], ["2", "notes.txt"]])
    assert str(tmp_path / "gone.jpg") in _error(load_manifest, missing)
    logged: list[str] = []
    bags = load_manifest(missing, on_bad_tile="skip", log=logged.append)
    assert [(b.bag_id, [p.name for p in b.tile_paths]) for b in bags] == [("1", ["a.jpg"]), ("2", ["b.jpg"])]
    assert len(logged) == 2 and "gone.jpg" in logged[0] and "notes.txt" in logged[1]
    all_gone = _write_csv(tmp_path / "all_gone.csv", ["bag_id", "path"], [["1", "a.jpg"], ["3", "x.jpg"]])
    assert "bag 3 has no usable tiles" in _error(load_manifest, all_gone, on_bad_tile="skip", log=logged.append)
    assert "not found" in _error(load_bags, tmp_path / "nothing.csv")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    assert "manifest .csv" in _error(load_bags, tmp_path / "list.txt")


def test_read_tile_truth(tmp_path):
    path = _write_csv(tmp_path / "tiles.csv", ["case", "path", "tile_label"],
                      [["A", "A/1.jpg", "1"], ["A", "A/2.jpg", "0"], ["B", "B/1.jpg", ""]])
    assert read_tile_truth(path) == {("A", "A/1.jpg"): 1, ("A", "A/2.jpg"): 0}
    bad = _write_csv(tmp_path / "bad.csv", ["case", "path", "tile_label"], [["A", "A/1.jpg", "yes"]])
    assert "bad.csv: line 2: tile A/1.jpg has label 'yes'" in _error(read_tile_truth, bad)
    dup = _write_csv(tmp_path / "dup.csv", ["case", "path", "tile_label"], [["A", "x.jpg", "1"], ["A", "x.jpg", "1"]])
    assert "more than once" in _error(read_tile_truth, dup)


def test_natural_key():
    names = ["10", "9", "1", "case10", "case2", "Case3", "b", "a"]
    assert sorted(names, key=natural_key) == ["1", "9", "10", "a", "b", "case2", "Case3", "case10"]

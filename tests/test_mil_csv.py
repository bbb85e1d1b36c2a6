"""The classical MIL CSV loader: grouping into bags, and one-line errors naming file:line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histomil.data.mil_csv import load_mil_csv
from histomil.errors import HistomilError


def write(tmp_path: Path, text: str, name: str = "bags.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_groups_rows_into_bags_in_order_of_first_appearance(tmp_path):
    path = write(tmp_path, "1,b7,1.5,2\n0,a3,0,-1\n1,b7,3,4e1\n\n0,a3,5,6\n0,a3,7,8\n")
    bags = load_mil_csv(path)
    assert [b.bag_id for b in bags] == ["b7", "a3"]
    assert [b.label for b in bags] == [1, 0]
    assert bags[0].features.dtype == np.float32
    np.testing.assert_array_equal(bags[0].features, [[1.5, 2.0], [3.0, 40.0]])
    np.testing.assert_array_equal(bags[1].features, [[0, -1], [5, 6], [7, 8]])
    assert bags[1].tile_paths == ["bags.csv:2", "bags.csv:5", "bags.csv:6"]  # source line of each instance


@pytest.mark.parametrize(
    "text, problem",
    [
        ("2,1,0.5,1\n", r"bags\.csv:1: bag label must be 0 or 1, got '2'"),
        ("1,1,0.5,1\nx,1,1,1\n", r"bags\.csv:2: bag label must be 0 or 1, got 'x'"),
        ("1,1,0.5,1\n0,2,1,1\n0,1,1,1\n", r"bags\.csv:3: bag '1' has label 0 here but 1 on earlier rows"),
        ("1,1,0.5,1\n1,1,1,1,9\n", r"bags\.csv:2: ragged row with 5 columns, earlier rows have 4"),
        ("1,1,0.5,1\n1,1,1,abc\n", r"bags\.csv:2: non-numeric feature 'abc' in column 4"),
        ("1,1,0.5,nan\n", r"bags\.csv:1: non-finite feature 'nan' in column 4"),
        ("1,1\n", r"bags\.csv:1: expected label, bag id and at least one feature"),
        ("", r"bags\.csv: empty MIL CSV file"),
        ("\n\n", r"bags\.csv: empty MIL CSV file"),
    ],
)
def test_bad_input_is_one_line_error_naming_file_and_line(tmp_path, text, problem):
    with pytest.raises(HistomilError, match=problem) as info:
        load_mil_csv(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(HistomilError, match=r"nope\.csv: cannot read MIL CSV"):
        load_mil_csv(tmp_path / "nope.csv")
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(HistomilError, match=r"bin\.csv: not a text CSV"):
        load_mil_csv(path)


def test_real_musk1_matches_the_file(shared_data):
    path = shared_data / "mil" / "musk1.csv"
    bags = load_mil_csv(path)
    assert len(bags) == 92
    assert sum(len(b) for b in bags) == 476
    assert {b.features.shape[1] for b in bags} == {166}
    assert sum(b.label for b in bags) == 47  # 47 musk (positive), 45 non-musk bags
    # the first row of the file is the first instance of the first bag
    first = path.read_text().splitlines()[0].split(",")
    assert bags[0].label == int(first[0]) and bags[0].bag_id == first[1]
    np.testing.assert_array_equal(bags[0].features[0], np.array(first[2:], dtype=np.float32))

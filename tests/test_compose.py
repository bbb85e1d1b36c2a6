"""Tests for composing MIL studies from a tile table (histomil.data.compose)."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from histomil.data import compose as C
from histomil.data.compose import compose_study, format_counts, read_study, split_names, study_counts
from histomil.data.study_spec import StudySpec, load_spec, parse_witnesses, spec_from_mapping
from histomil.data.tile_table import TileTable, assign_patients, read_tile_table
from histomil.errors import HistomilError

# ---------------------------------------------------------------------------------------------
# helpers


def make_table(
    folder: Path,
    patients: dict[str, tuple[int, int]],
    n_unlabelled: int = 0,
    splits: dict[str, str] | None = None,
    name: str = "tiles.csv",
) -> Path:
    """Fake tiles (tiny files) and a CSV: patients -> (tumour tiles, non-tumour tiles)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for patient, (n_t, n_n) in patients.items():
        for i in range(n_t + n_n + n_unlabelled):
            label = "1" if i < n_t else ("0" if i < n_t + n_n else "")
            rel = f"img/p{patient}_{i:03d}.jpg"
            (folder / rel).write_bytes(f"{patient}:{i}".encode())
            row = {"path": rel, "case_id": patient, "tumor": label}
            if splits is not None:
                row["split"] = splits[patient]
            rows.append(row)
    csv_path = folder / name
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return csv_path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_study(out: Path, table: TileTable, spec: StudySpec) -> dict[str, dict]:
    """Assert every invariant of a composed study; return per split {case: (y, [W], tiles)}."""
    study = json.loads((out / "study.json").read_text())
    label_of = dict(zip(table.paths, table.labels.tolist()))
    patient_of = dict(zip(table.paths, table.patients))
    role_patients: dict[str, set[str]] = defaultdict(set)
    result = {}
    assert [s["name"] for s in study["splits"]] == split_names(spec)
    for s in study["splits"]:
        name, role = s["name"], s["role"]
        sdir = out / name
        labels = {int(r["case"]): int(r["y_true"]) for r in read_csv(sdir / "labels.csv")}
        assert sorted(labels) == list(range(s["n_bags"]))  # case ids 0..n-1
        n_pos = sum(labels.values())
        assert n_pos == s["n_pos"] == C._n_positive(s["n_bags"], spec.positive_fraction)
        assert s["n_neg"] == s["n_bags"] - n_pos
        bags: dict[int, list[dict]] = defaultdict(list)
        for r in read_csv(sdir / "tiles.csv"):
            bags[int(r["case"])].append(r)
        assert sorted(bags) == sorted(labels)
        lo, hi = s["witnesses"]
        per_bag = {}
        for case, rows in bags.items():
            assert len(rows) == spec.bag_size
            sources = [r["source"] for r in rows]
            assert len(set(sources)) == spec.bag_size, "a tile twice in one bag"
            for pos, r in enumerate(rows):
                assert r["path"].startswith(f"{case}/{pos:02d}_")
                assert r["path"].endswith(os.path.basename(r["source"]))
                assert int(r["tile_label"]) == label_of[r["source"]]  # truth matches the source table
                assert r["patient"] == patient_of[r["source"]]
                role_patients[role].add(r["patient"])
                f = sdir / r["path"]
                assert f.is_file()
                if spec.link == "symlink":
                    assert f.is_symlink() and os.readlink(f) == r["source"]
                assert f.read_bytes() == Path(r["source"]).read_bytes()
            assert sorted(p.name for p in (sdir / str(case)).iterdir()) == sorted(
                r["path"].split("/", 1)[1] for r in rows
            )
            w = sum(int(r["tile_label"]) for r in rows)
            if labels[case] == 1:
                assert lo <= w <= hi
            else:
                assert w == 0
            per_bag[case] = (labels[case], w, [int(r["tile_label"]) for r in rows])
        assert s["n_patients"] == len(study["patients"][role])
        assert {patient_of[r] for r in label_of if patient_of[r] in role_patients[role]} <= set(study["patients"][role])
        result[name] = per_bag
    roles = list(role_patients)
    for i, a in enumerate(roles):  # no patient in two splits
        for b in roles[i + 1 :]:
            assert not role_patients[a] & role_patients[b], (a, b)
    return result


def spec(**kw) -> StudySpec:
    base = {
        "bag_size": 10,
        "train_bags": 20,
        "val_bags": 6,
        "test_bags": 8,
        "train_witnesses": (2, 6),
        "val_witnesses": (3, 3),
        "test_witnesses": [5, 1],
        "split_fractions": (0.5, 0.25, 0.25),
    }
    base.update(kw)
    return StudySpec(**base)


PATIENTS = {f"{i:02d}": (8, 10) for i in range(12)}


@pytest.fixture
def table(tmp_path: Path) -> TileTable:
    return read_tile_table(make_table(tmp_path / "data", PATIENTS, n_unlabelled=2))


# ---------------------------------------------------------------------------------------------
# spec


def test_parse_witnesses():
    assert parse_witnesses("20") == (20, 20)
    assert parse_witnesses(" 1-20 ") == (1, 20)
    for bad in ("", "a", "1-2-3", "0", "5-2", "-3", "1.5"):
        with pytest.raises(HistomilError, match="witnesses"):
            parse_witnesses(bad)


def test_spec_defaults_match_original_study():
    s = StudySpec()
    assert (s.bag_size, s.train_bags, s.val_bags, s.test_bags) == (40, 2000, 100, 1000)
    assert s.train_witnesses == (20, 20) and s.test_witnesses == [20, 10, 5, 1]
    assert split_names(s) == ["train", "val", "test_40_20", "test_40_10", "test_40_5", "test_40_1"]


def test_spec_coercion_and_validation(tmp_path: Path):
    s = StudySpec(train_witnesses="1-20", val_witnesses=7, test_witnesses="20,5")
    assert s.train_witnesses == (1, 20) and s.val_witnesses == (7, 7) and s.test_witnesses == [20, 5]
    bad = [
        {"bag_sise": 40},  # unknown key
        {"train_witnesses": (1, 41)},
        {"val_witnesses": (5, 2)},
        {"test_witnesses": [0]},
        {"test_witnesses": [5, 5]},
        {"split_fractions": (0.5, 0.2, 0.2)},
        {"split_fractions": (1.2, -0.1, -0.1)},
        {"train_bags": -1},
        {"positive_fraction": 1.5},
        {"bag_size": 0},
    ]
    for kw in bad:
        with pytest.raises(HistomilError) as exc:
            spec_from_mapping(kw, source="my.yaml")
        msg = str(exc.value)
        assert msg.startswith("my.yaml: ") and "\n" not in msg
        assert next(iter(kw)) in msg or "bag_size" in msg, msg
    cfg = tmp_path / "study.yaml"
    cfg.write_text("bag_size: 12\ntrain_witnesses: 1-12\nval_witnesses: 6\ntest_witnesses: [12, 1]\n")
    s = load_spec(cfg)
    assert s.bag_size == 12 and s.train_witnesses == (1, 12)
    cfg.write_text("bag_size: 12\ncolour: red\n")
    with pytest.raises(HistomilError, match=r"study\.yaml: colour: unknown setting \(settings: bag_size, "):
        load_spec(cfg)


# ---------------------------------------------------------------------------------------------
# tile table


def test_read_tile_table(tmp_path: Path):
    csv_path = make_table(tmp_path, {"a": (2, 3), "b": (1, 1)}, n_unlabelled=2)
    t = read_tile_table(csv_path)
    assert len(t) == 7 and t.n_excluded == 4
    assert t.labels.tolist() == [1, 1, 0, 0, 0, 1, 0]
    assert t.patients == ["a"] * 5 + ["b"] * 2
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in t.paths)
    assert t.paths[0] == str(tmp_path / "img" / "pa_000.jpg")
    assert t.patient_counts() == {"a": (2, 3), "b": (1, 1)}
    assert t.splits is None and t.lines[0] == 2


def test_read_tile_table_absolute_paths_and_float_labels(tmp_path: Path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    csv_path = tmp_path / "sub" / "t.csv"
    csv_path.write_text(f"file,y,pid\n{f},1.0,p1\n../x2.jpg,0.0,p2\n")
    (tmp_path / "x2.jpg").write_bytes(b"y")
    t = read_tile_table(csv_path, path_col="file", label_col="y", patient_col="pid")
    assert t.paths == [str(f), str(tmp_path / "x2.jpg")] and t.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("path,case_id\nimg/a.jpg,1\n", r"t\.csv: missing column\(s\) 'tumor'"),
        ("", r"t\.csv: missing column\(s\) 'path', 'tumor', 'case_id' \(columns: none"),
        ("path,tumor,case_id\nimg/a.jpg,2,p\n", r"t\.csv line 2: column 'tumor' must be 0 or 1.*'2'"),
        (
            "path,tumor,case_id\nimg/a.jpg,1,p\nimg/nope.jpg,0,p\n",
            r"t\.csv line 3: tile file .*nope\.jpg does not exist",
        ),
        (
            "path,tumor,case_id\nimg/a.jpg,1,p\nimg/a.jpg,1,p\n",
            r"t\.csv line 3: tile img/a\.jpg is listed twice \(also line 2\)",
        ),
        ("path,tumor,case_id\nimg/a.jpg,1,\n", r"t\.csv line 2: empty patient id"),
        ("path,tumor,case_id\nimg/a.jpg,,p\n", r"t\.csv: no labelled tiles \(1 row"),
    ],
)
def test_read_tile_table_errors(tmp_path: Path, text: str, pattern: str):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"a")
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(HistomilError, match=pattern) as exc:
        read_tile_table(tmp_path / "t.csv")
    assert "\n" not in str(exc.value)


def test_read_tile_table_missing_file_error(tmp_path: Path):
    with pytest.raises(HistomilError, match=r"nope\.csv: cannot read tile table"):
        read_tile_table(tmp_path / "nope.csv")


def test_read_tile_table_bad_split_value(tmp_path: Path):
    csv_path = make_table(tmp_path, {"a": (1, 1)}, splits={"a": "holdout"})
    with pytest.raises(HistomilError, match=r"line 2: column 'split' must be train, val or test, got 'holdout'"):
        read_tile_table(csv_path, split_col="split")


# ---------------------------------------------------------------------------------------------
# patient split


def test_assign_patients_balanced_and_deterministic(tmp_path: Path):
    # unequal patients: some tumour-only, some normal-only, some mixed
    pats = {f"{i:02d}": ((i * 7) % 11, (i * 5) % 9) for i in range(60)}
    pats = {p: c for p, c in pats.items() if sum(c)}
    t = read_tile_table(make_table(tmp_path, pats))
    a = assign_patients(t, (0.6, 0.2, 0.2), seed=3)
    assert set(a) == set(pats) and set(a.values()) == {"train", "val", "test"}
    assert a == assign_patients(t, (0.6, 0.2, 0.2), seed=3)
    assert a != assign_patients(t, (0.6, 0.2, 0.2), seed=4)
    tot_t = sum(c[0] for c in pats.values())
    tot_n = sum(c[1] for c in pats.values())
    for split, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
        got_t = sum(pats[p][0] for p, s in a.items() if s == split)
        got_n = sum(pats[p][1] for p, s in a.items() if s == split)
        assert abs(got_t / tot_t - frac) < 0.03, (split, got_t / tot_t)
        assert abs(got_n / tot_n - frac) < 0.03, (split, got_n / tot_n)
    # a zero fraction gets nobody
    a0 = assign_patients(t, (0.8, 0.0, 0.2), seed=0)
    assert "val" not in a0.values() and set(a0.values()) == {"train", "test"}


def test_assign_patients_from_split_column(tmp_path: Path):
    splits = {"a": "train", "b": "Validation", "c": "test"}
    t = read_tile_table(make_table(tmp_path, {"a": (2, 2), "b": (2, 2), "c": (2, 2)}, splits=splits), split_col="split")
    assert assign_patients(t, (1.0, 0.0, 0.0), seed=0) == {"a": "train", "b": "val", "c": "test"}


def test_assign_patients_refuses_patient_in_two_splits(tmp_path: Path):
    csv_path = make_table(tmp_path, {"a": (2, 2), "b": (1, 1)}, splits={"a": "train", "b": "test"})
    rows = read_csv(csv_path)
    rows[3]["split"] = "test"  # patient a, 4th row -> line 5
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    t = read_tile_table(csv_path, split_col="split")
    with pytest.raises(
        HistomilError, match=r"tiles\.csv line 5: patient a is in split 'test' but also in 'train' \(line 2\)"
    ):
        assign_patients(t, (0.6, 0.2, 0.2), 0)
    with pytest.raises(HistomilError, match="patient a"):
        compose_study(t, spec(), tmp_path / "study")
    assert not (tmp_path / "study").exists()


# ---------------------------------------------------------------------------------------------
# composition


def test_compose_synthetic_study(table: TileTable, tmp_path: Path):
    s = spec()
    calls = []
    out = tmp_path / "study"
    study = compose_study(table, s, out, progress=lambda n, d, t: calls.append((n, d, t)))
    assert study == read_study(out)
    bags = check_study(out, table, s)
    assert sorted(os.listdir(out)) == sorted(["study.json", *split_names(s)])
    assert list(bags) == ["train", "val", "test_10_5", "test_10_1"]
    # 1:1, exact counts
    assert Counter(y for y, _, _ in bags["train"].values()) == {1: 10, 0: 10}
    assert Counter(y for y, _, _ in bags["val"].values()) == {1: 3, 0: 3}
    # W range draws stay in range and vary; fixed W is exact
    w_train = [w for y, w, _ in bags["train"].values() if y == 1]
    assert min(w_train) >= 2 and max(w_train) <= 6 and len(set(w_train)) >= 3
    assert {w for y, w, _ in bags["val"].values() if y == 1} == {3}
    assert {w for y, w, _ in bags["test_10_5"].values() if y == 1} == {5}
    assert {w for y, w, _ in bags["test_10_1"].values() if y == 1} == {1}
    # witness tiles are not always first in the bag
    firsts = [tl.index(1) for y, _, tl in bags["test_10_1"].values() if y == 1]
    assert len(set(firsts)) > 1
    # labels are shuffled, not all positives first
    assert [y for _, (y, _, _) in sorted(bags["train"].items())] != [1] * 10 + [0] * 10
    # study.json describes splits, pools and excluded rows
    assert study["n_excluded"] == 24 and study["n_tiles"] == len(table)
    by = {x["name"]: x for x in study["splits"]}
    test_pat = study["patients"]["test"]
    assert by["test_10_1"]["pool"] == {"tumour": 8 * len(test_pat), "non_tumour": 10 * len(test_pat)}
    assert by["train"]["witnesses"] == [2, 6] and by["train"]["witnesses_drawn"]["min"] >= 2
    assert study["spec"]["bag_size"] == 10 and study["split_source"] == "fractions"
    assert sorted(p for ps in study["patients"].values() for p in ps) == sorted(PATIENTS)
    # progress: 0..n for every split
    assert calls[0] == ("train", 0, 20) and calls[20] == ("train", 20, 20)
    assert len(calls) == sum(x["n_bags"] + 1 for x in study["splits"])
    # counts for the CLI
    rows = study_counts(study)
    assert rows[0] == {
        "split": "train",
        "bags": 20,
        "positive": 10,
        "negative": 10,
        "W": "2-6",
        "patients": len(study["patients"]["train"]),
        "tumour_tiles": by["train"]["pool"]["tumour"],
        "non_tumour_tiles": by["train"]["pool"]["non_tumour"],
        "tiles_used": by["train"]["tiles_used"],
    }
    text = format_counts(study)
    assert "test_10_1" in text and "24 row(s) with an empty label excluded" in text


def test_compose_is_deterministic(table: TileTable, tmp_path: Path):
    def snapshot(out: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(out)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }

    s = spec(seed=7)
    compose_study(table, s, tmp_path / "a")
    compose_study(table, s, tmp_path / "b")
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert len(a) > 300 and a == b
    compose_study(table, spec(seed=8), tmp_path / "c")
    c = snapshot(tmp_path / "c")
    assert a["train/tiles.csv"] != c["train/tiles.csv"]
    # adding a test set does not change the other splits' bags
    compose_study(table, spec(seed=7, test_witnesses=[5, 1, 3]), tmp_path / "d")
    d = snapshot(tmp_path / "d")
    for k in ("train/tiles.csv", "val/tiles.csv", "test_10_1/tiles.csv", "test_10_1/labels.csv"):
        assert a[k] == d[k]


def test_positive_count_rounding_and_extremes(table: TileTable, tmp_path: Path):
    s = spec(train_bags=5, val_bags=3, test_bags=0, positive_fraction=0.5)
    study = compose_study(table, s, tmp_path / "s")
    by = {x["name"]: x for x in study["splits"]}
    assert (by["train"]["n_pos"], by["train"]["n_neg"]) == (3, 2)  # round half up
    assert (by["val"]["n_pos"], by["val"]["n_neg"]) == (2, 1)
    assert [x["name"] for x in study["splits"]] == ["train", "val"]  # 0 test bags -> no test split
    study = compose_study(table, spec(positive_fraction=0.0), tmp_path / "neg")
    assert all(x["n_pos"] == 0 for x in study["splits"])
    check_study(tmp_path / "neg", table, spec(positive_fraction=0.0))


@pytest.mark.parametrize("link", ["hardlink", "copy"])
def test_compose_hardlink_and_copy(table: TileTable, tmp_path: Path, link: str):
    s = spec(link=link, train_bags=4, val_bags=2, test_bags=2)
    compose_study(table, s, tmp_path / "s")
    check_study(tmp_path / "s", table, s)
    rows = read_csv(tmp_path / "s" / "train" / "tiles.csv")
    f = tmp_path / "s" / "train" / rows[0]["path"]
    assert not f.is_symlink()
    same_inode = os.stat(f).st_ino == os.stat(rows[0]["source"]).st_ino
    assert same_inode == (link == "hardlink")


def test_capacity_errors(tmp_path: Path):
    # test patients: 2 of 8 -> 2*3 = 6 tumour tiles and 2*9 = 18 non-tumour tiles
    pats = {f"p{i}": (3, 9) for i in range(8)}
    t = read_tile_table(make_table(tmp_path / "d", pats))
    fr = (0.5, 0.25, 0.25)
    with pytest.raises(HistomilError) as exc:
        compose_study(t, spec(bag_size=20, test_witnesses=[1], split_fractions=fr), tmp_path / "o")
    msg = str(exc.value)
    assert msg.startswith(str(t.source)) and "\n" not in msg
    # train has 4 patients -> 36 non-tumour tiles, enough; val has 2 -> 18 < 20
    assert "split 'val' (val patients) has 18 non-tumour tiles but a negative bag needs 20" in msg
    with pytest.raises(
        HistomilError,
        match=r"split 'test_10_8' \(test patients\) has 6 tumour tiles but a positive bag with W=8 needs 8",
    ):
        compose_study(t, spec(test_witnesses=[5, 8], val_witnesses=(4, 4), split_fractions=fr), tmp_path / "o")
    with pytest.raises(HistomilError, match=r"split 'val' \(val patients\) has 0 non-tumour tiles"):
        compose_study(t, spec(split_fractions=(0.8, 0.0, 0.2)), tmp_path / "o")
    # positive bag with few witnesses needs many non-tumour tiles
    with pytest.raises(
        HistomilError, match=r"split 'val' .* has 18 non-tumour tiles but a positive bag with W=1 needs 19"
    ):
        compose_study(
            t,
            spec(bag_size=20, val_witnesses=(1, 6), positive_fraction=1.0, split_fractions=fr, test_bags=0),
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()
    # no temp folders left behind; the compose lock file stays (removing a lock file races its next holder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.compose.lock", "d"]


def test_out_dir_refused_then_replaced_atomically(table: TileTable, tmp_path: Path, monkeypatch):
    out = tmp_path / "study"
    out.mkdir()  # an existing empty folder is fine
    compose_study(table, spec(seed=1), out)
    first = (out / "train" / "tiles.csv").read_bytes()
    (out / "note.txt").write_text("old")
    with pytest.raises(HistomilError, match=r"study: folder exists and is not empty; pass overwrite"):
        compose_study(table, spec(seed=2), out)

    # a run that fails half-way leaves the old study untouched and no temp folder behind
    calls = {"n": 0}
    real_place = C._place

    def flaky(src, dst, link):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError("disk full")
        real_place(src, dst, link)

    monkeypatch.setattr(C, "_place", flaky)
    with pytest.raises(OSError, match="disk full"):
        compose_study(table, spec(seed=2), out, overwrite=True)
    monkeypatch.setattr(C, "_place", real_place)
    assert (out / "note.txt").read_text() == "old" and (out / "train" / "tiles.csv").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".study.compose.lock", "data", "study"]

    compose_study(table, spec(seed=2), out, overwrite=True)
    assert not (out / "note.txt").exists()
    assert (out / "train" / "tiles.csv").read_bytes() != first
    assert read_study(out)["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".study.compose.lock", "data", "study"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(HistomilError, match="exists and is not a folder"):
        compose_study(table, spec(), f, overwrite=True)


def test_overwrite_refuses_when_tiles_live_inside_out_dir(tmp_path: Path):
    t = read_tile_table(make_table(tmp_path / "data", PATIENTS))
    with pytest.raises(HistomilError, match=r"lies inside .*data, which overwrite would delete"):
        compose_study(t, spec(), tmp_path / "data", overwrite=True)


def test_compose_with_split_column(tmp_path: Path):
    splits = {f"{i:02d}": ("train", "train", "train", "val", "test")[i % 5] for i in range(10)}
    t = read_tile_table(make_table(tmp_path / "d", {p: (6, 12) for p in splits}, splits=splits), split_col="split")
    s = spec()
    study = compose_study(t, s, tmp_path / "s")
    check_study(tmp_path / "s", t, s)
    assert study["split_source"] == "column"
    assert study["patients"] == {r: sorted(p for p, x in splits.items() if x == r) for r in ("train", "val", "test")}


def test_read_study_errors(tmp_path: Path):
    with pytest.raises(HistomilError, match=r"study\.json: cannot read"):
        read_study(tmp_path)
    (tmp_path / "study.json").write_text("{}")
    with pytest.raises(HistomilError, match="not a histomil study"):
        read_study(tmp_path)


# ---------------------------------------------------------------------------------------------
# real data


def test_compose_real_ebhi_table(ebhi_table: Path, tmp_path: Path):
    t = read_tile_table(ebhi_table)
    assert t.n_excluded > 0 and len(t) + t.n_excluded == len(read_csv(ebhi_table))
    s = StudySpec(train_bags=20, val_bags=10, test_bags=10, test_witnesses=[20, 1], seed=0)
    out = tmp_path / "ebhi_study"
    study = compose_study(t, s, out)
    bags = check_study(out, t, s)
    assert [x["name"] for x in study["splits"]] == ["train", "val", "test_40_20", "test_40_1"]
    for name, per_bag in bags.items():
        ys = [y for y, _, _ in per_bag.values()]
        assert ys.count(1) == ys.count(0) == len(ys) // 2
    assert {w for y, w, _ in bags["test_40_1"].values() if y == 1} == {1}
    assert {w for y, w, _ in bags["train"].values() if y == 1} == {20}
    # each split's pool holds roughly its share of both classes (greedy patient balance)
    tot_t, tot_n = int(t.labels.sum()), int((t.labels == 0).sum())
    by = {x["name"]: x for x in study["splits"]}
    for name, frac in (("train", 0.6), ("val", 0.2), ("test_40_20", 0.2)):
        assert abs(by[name]["pool"]["tumour"] / tot_t - frac) < 0.05
        assert abs(by[name]["pool"]["non_tumour"] / tot_n - frac) < 0.05
    # a file name keeps the original tile name after the position prefix
    row = read_csv(out / "test_40_1" / "tiles.csv")[0]
    assert row["path"].startswith("0/00_GT") and Path(out / "test_40_1" / row["path"]).resolve() == Path(row["source"]).resolve()

"""The synthetic slide cohort: OpenSlide reads its slides, the tiler cuts exactly its tiles, the truth is
right to the pixel, patients never share a source patient, and one seed gives one cohort."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from histomil.data.images import read_rgb
from histomil.data.synthetic_cohort import SynthCohortSpec, build_cohort
from histomil.errors import HistomilError
from histomil.resources import example_tile_table
from histomil.slides.reader import open_slide
from histomil.slides.tiling import TilingSpec, plan_tiles

SPEC = dict(patients=6, grid_min=3, grid_max=4, margin=2, multi_slide_fraction=0.5, no_mpp_slides=1, seed=3)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    build_cohort(example_tile_table(), out, SynthCohortSpec(**SPEC))
    return out


def test_cohort_table_labels_splits_and_truth_agree(cohort: Path) -> None:
    table = _rows(cohort / "cohort.csv")
    truth = _rows(cohort / "truth.csv")
    assert list(table[0]) == ["slide", "patient", "label", "split"]
    label = {r["patient"]: r["label"] for r in table}
    assert all(label[r["patient"]] == r["label"] for r in table)  # one label per patient
    assert len({r["patient"] for r in table}) == 6 and len(table) > 6  # some patients have several slides
    split = {r["patient"]: r["split"] for r in table}
    assert {(label[p], split[p]) for p in label} >= {("0", "test"), ("1", "test"), ("0", "train"), ("1", "train")}
    tumour = {}
    for r in truth:
        tumour[r["slide"]] = tumour.get(r["slide"], 0) + int(r["is_tumour"])
        assert (r["content"] == "tumour") == (r["is_tumour"] == "1")
        assert int(r["x"]) == int(r["col"]) * 224 and int(r["y"]) == int(r["row"]) * 224
    for r in table:  # negatives have no tumour; every positive patient has some
        assert tumour[r["slide"]] == 0 or r["label"] == "1"
    for p in label:
        assert (sum(tumour[r["slide"]] for r in table if r["patient"] == p) > 0) == (label[p] == "1")
    sizes = sorted(n for n in tumour.values() if n)
    assert sizes[0] == 1 and sizes[-1] >= 4  # from a single tile to a region
    meta = json.loads((cohort / "cohort.json").read_text())
    donors = [set(p["donor_cases"]) for p in meta["patients"].values()]
    assert sum(len(d) for d in donors) == len(set().union(*donors))  # no source patient in two patients
    assert "EBHI-Seg" in meta["spec"]["attribution"] and "CC BY 4.0" in (cohort / "README.md").read_text()


def test_slides_open_with_resolution_and_hold_the_truth_tiles(cohort: Path) -> None:
    meta = json.loads((cohort / "cohort.json").read_text())
    truth = _rows(cohort / "truth.csv")
    no_mpp = [f["slide"] for f in meta["slides"] if f["mpp"] is None]
    assert len(no_mpp) == 1
    base = example_tile_table().parent
    for fact in meta["slides"]:
        with open_slide(cohort / "slides" / f"{fact['slide']}.tif") as slide:
            assert slide.dimensions == (fact["width"], fact["height"])
            assert slide.level_count >= 2 and slide.level_downsamples[1] == pytest.approx(2.0)
            assert slide.mpp == (None if fact["slide"] in no_mpp else pytest.approx(0.5))
            cells = [r for r in truth if r["slide"] == fact["slide"]]
            for r in cells[:: max(1, len(cells) // 6)] + [r for r in cells if r["is_tumour"] == "1"][:2]:
                region = slide.read_region((int(r["x"]), int(r["y"])), 0, 224)
                if r["content"] == "background":
                    assert (region == np.array([243, 242, 240], dtype=np.uint8)).all()
                else:
                    k = int(r["orientation"])
                    want = np.rot90(read_rgb(base / r["source"]), k % 4)
                    want = want[:, ::-1] if k >= 4 else want
                    assert np.array_equal(region, want)  # lossless: the tile itself


def test_tiler_cuts_exactly_the_grid_tiles(cohort: Path) -> None:
    truth = _rows(cohort / "truth.csv")
    for name in sorted(p.stem for p in (cohort / "slides").glob("*.tif"))[:4]:
        with open_slide(cohort / "slides" / f"{name}.tif", mpp=0.5) as slide:
            plan = plan_tiles(slide, TilingSpec(tile_size=224, mpp=0.5))
        cells = {(int(r["x"]), int(r["y"])): r["content"] for r in truth if r["slide"] == name}
        cut = {tuple(c) for c in plan.coords.tolist()}
        assert cut and all(cells.get(c, "background") != "background" for c in cut)
        assert plan.patch_size_level0 == 224
        tumour = {c for c, content in cells.items() if content == "tumour"}
        assert tumour <= cut  # tumour tiles are never lost to tissue detection


def test_same_seed_same_cohort_other_seed_other(cohort: Path, tmp_path: Path) -> None:
    build_cohort(example_tile_table(), tmp_path / "again", SynthCohortSpec(**SPEC))
    for name in ("cohort.csv", "truth.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (cohort / name).read_bytes()
    first = sorted((cohort / "slides").glob("*.tif"))[0]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "again" / "slides" / first.name) == digest(first)
    build_cohort(example_tile_table(), tmp_path / "other", SynthCohortSpec(**{**SPEC, "seed": 4}))
    assert (tmp_path / "other" / "truth.csv").read_bytes() != (cohort / "truth.csv").read_bytes()


def test_bad_requests_are_one_line_errors(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(HistomilError, match="too few tumour patients"):
        build_cohort(example_tile_table(), tmp_path / "big", SynthCohortSpec(patients=60, positive_fraction=0.5))
    with pytest.raises(HistomilError, match="not empty; use --overwrite"):
        build_cohort(example_tile_table(), cohort, SynthCohortSpec(**SPEC))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(HistomilError, match="not a synthetic cohort folder"):
        build_cohort(example_tile_table(), tmp_path / "other", SynthCohortSpec(**SPEC), overwrite=True)
    with pytest.raises(HistomilError, match="tile is 224x224 pixels, the cohort needs 256x256"):
        build_cohort(example_tile_table(), tmp_path / "size", SynthCohortSpec(**{**SPEC, "tile_size": 256}))
    with pytest.raises(ValueError, match="grid_min"):
        SynthCohortSpec(grid_min=5, grid_max=4)


def test_overwrite_replaces_a_cohort_and_its_stale_slides(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    build_cohort(example_tile_table(), out, SynthCohortSpec(**{**SPEC, "patients": 8}))
    build_cohort(example_tile_table(), out, SynthCohortSpec(**SPEC), overwrite=True)
    slides = {r["slide"] for r in _rows(out / "cohort.csv")}
    assert {p.stem for p in (out / "slides").glob("*.tif")} == slides


def test_cli_options_are_checked_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histomil.cli import app

    result = CliRunner().invoke(app, ["synth-cohort", "--out", str(tmp_path / "c"), "--grid-min", "5", "--grid-max", "4"])
    assert result.exit_code == 2 and "grid_min (5) is larger than grid_max (4)" in result.output
    assert not (tmp_path / "c").exists()
    result = CliRunner().invoke(app, ["localise", str(tmp_path / "truth.csv"), str(tmp_path)])
    assert result.exit_code == 2 and "truth table not found" in result.output

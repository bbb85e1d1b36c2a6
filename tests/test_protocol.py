"""Patient-grouped cross-validation: folds that never leak, thresholds from validation only, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from tiny_runs import write_tiny_crossval_config
from typer.testing import CliRunner

from histomil.commands.crossval import crossval_cmd
from histomil.data.tile_table import read_tile_table
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import METRICS
from histomil.evaluation.protocol import (
    check_no_leak,
    composed_patients,
    holdout_patients,
    load_crossval_config,
    patient_folds,
    read_predictions,
    run_crossval,
)
from histomil.evaluation.threshold import choose_threshold
from histomil.resources import example_tile_table
from histomil.training.checkpoint import read_checkpoint_dict

pytestmark = pytest.mark.usefixtures("fast_encoder")  # the stand-in encoder of tiny_runs.py

# ------------------------------------------------------------------------------ folds


@pytest.mark.parametrize("seed", [0, 1])
def test_folds_never_leak_and_test_every_patient_once(seed):
    table = read_tile_table(example_tile_table())
    folds = patient_folds(table, k=3, seed=seed, val_fraction=0.25)
    patients = set(table.patients)
    tested: list[str] = []
    counts = table.patient_counts()
    for roles in folds:
        assert set(roles) == patients and set(roles.values()) == {"train", "val", "test"}
        check_no_leak({r: [p for p, x in roles.items() if x == r] for r in ("train", "val", "test")})
        tested += [p for p, r in roles.items() if r == "test"]
        # stratified by tile label: each role holds tumour and non-tumour tiles
        for role in ("train", "val", "test"):
            tum = sum(counts[p][0] for p, r in roles.items() if r == role)
            non = sum(counts[p][1] for p, r in roles.items() if r == role)
            assert tum > 0 and non > 0, (role, tum, non)
        # about 1/3 of the tumour tiles in the test fold (116 in all)
        test_tum = sum(counts[p][0] for p, r in roles.items() if r == "test")
        assert 116 / 3 * 0.6 < test_tum < 116 / 3 * 1.4
    assert sorted(tested) == sorted(patients)  # every patient tested exactly once per seed


def test_folds_depend_on_seed_and_are_reproducible(ebhi_table):
    table = read_tile_table(ebhi_table)
    a = patient_folds(table, 5, seed=0)
    assert a == patient_folds(table, 5, seed=0)
    assert a != patient_folds(table, 5, seed=1)
    tested = [p for roles in a for p, r in roles.items() if r == "test"]
    assert len(tested) == len(set(tested)) == len(set(table.patients))
    # patients with tiles of both classes (EBHI has some) are still tested once, whole
    both = [p for p, (t, n) in table.patient_counts().items() if t and n]
    assert both


def test_leak_check_names_the_patient():
    with pytest.raises(HistomilError, match=r"patient P7 is in both 'train' and 'test'"):
        check_no_leak({"train": ["P1", "P7"], "val": ["P2"], "test": ["P3", "P7"]}, "fold 0")
    check_no_leak({"train": ["P1"], "val": ["P2"], "test": ["P3"]})


def test_split_column_that_leaks_is_refused(tmp_path):
    src = example_tile_table()
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    first = rows[0]["case_id"]
    for r in rows:
        r["path"] = str(src.parent / r["path"])
    moved = next(r for r in rows if r["case_id"] == first and r["split"] == "train")
    moved["split"] = "test"
    bad = tmp_path / "tiles.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = read_tile_table(bad, split_col="split")
    with pytest.raises(HistomilError, match=rf"patient {first} is in split"):
        holdout_patients(table)


def test_holdout_fraction_is_fixed_and_disjoint():
    table = read_tile_table(example_tile_table())
    h = holdout_patients(table, 0.2, seed=0)
    assert h == holdout_patients(table, 0.2, seed=0)
    n = len(set(table.patients))
    assert 0.1 * n < len(h) < 0.3 * n
    counts = table.patient_counts()
    assert sum(counts[p][0] for p in h) > 0 and sum(counts[p][1] for p in h) > 0
    assert holdout_patients(table, 0.0) == set()


def test_config_errors_name_the_setting(tmp_path):
    cfg = tmp_path / "cv.yaml"
    cfg.write_text("tiles: t.csv\nstudy: {seed: 3}\n")
    with pytest.raises(HistomilError, match=r"cv.yaml: .*study.seed is not used"):
        load_crossval_config(cfg)
    cfg.write_text("tiles: t.csv\nfolds: 1\n")
    with pytest.raises(HistomilError, match="folds"):
        load_crossval_config(cfg)
    cfg.write_text("tiles: t.csv\nthreshold: {rule: youden, value: 0.3}\n")
    with pytest.raises(HistomilError, match="youden rule takes no value"):
        load_crossval_config(cfg)
    cfg.write_text("tiles: t.csv\nfoldz: 3\n")
    with pytest.raises(HistomilError, match="foldz"):
        load_crossval_config(cfg)
    ok = load_crossval_config(_write(tmp_path / "ok.yaml", {"tiles": "t.csv"}), {"folds": 3, "train.epochs": 2})
    assert ok.folds == 3 and ok.train.epochs == 2 and ok.tiles == (tmp_path / "t.csv").resolve()


def test_shipped_example_config_is_valid():
    path = Path(__file__).resolve().parents[1] / "configs" / "crossval_ebhi.yaml"
    cfg = load_crossval_config(path)
    assert cfg.tiles.is_file()
    assert cfg.folds >= 3 and cfg.bootstrap_resamples == 1000


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, fast_encoder):
    root = tmp_path_factory.mktemp("cv")
    cfg_path = write_tiny_crossval_config(root / "cv.yaml")
    cfg = load_crossval_config(cfg_path)
    out = root / "out"
    lines: list[str] = []
    summary = run_crossval(cfg, out, log=lines.append)
    return cfg_path, cfg, out, summary, lines


def test_crossval_writes_reports_and_per_fold_results(tiny):
    _, _, out, summary, _ = tiny
    for name in ("crossval.json", "crossval.md", "config.json", "holdout.json", "seed_0/folds.json"):
        assert (out / name).is_file(), name
    for png in ("roc_pr.png", "reliability.png"):
        assert (out / png).stat().st_size > 5000
    sets = ["test_10_5", "test_10_1", "holdout_10_5", "holdout_10_1"]
    assert list(summary["test_sets"]) == sets
    assert summary["n_runs"] == 2
    for f in (0, 1):
        fd = out / "seed_0" / f"fold_{f}"
        for name in ["metrics.json", "predictions_val.csv", "model/model.pt", "model/history.csv", "training_curves.png"]:
            assert (fd / name).is_file(), (f, name)
        for s in sets:
            assert (fd / f"predictions_{s}.csv").is_file()
        # intermediate files go once the fold is done; what documents the fold stays
        assert not (fd / "features").exists() and not (fd / "model" / "last.pt").exists()
        assert sorted(p.name for p in (fd / "bags" / "train").iterdir())[-3:] == ["labels.csv", "targets.csv", "tiles.csv"]
        assert (fd / "bags" / "train" / "0").is_dir()  # bag folders stay unless prune_bags
    assert not (out / "seed_0" / "holdout" / "features").exists()
    assert any((out / "cache").rglob("shard-*.h5"))  # the shared tile cache stays

    rec = [json.loads((out / "seed_0" / f"fold_{f}" / "metrics.json").read_text()) for f in (0, 1)]
    for name in sets:
        s = summary["test_sets"][name]
        assert s["n_bags_pooled"] == 2 * 8 and s["n_pos_pooled"] == 2 * 4
        for m in METRICS:
            vals = [r["test_sets"][name][m] for r in rec]
            if all(v is not None for v in vals):
                assert s["metrics"][m]["mean"] == pytest.approx(np.mean(vals))
                assert s["metrics"][m]["std"] == pytest.approx(np.std(vals, ddof=1))
            pooled = s["metrics"][m]["pooled"]
            assert pooled["low"] <= pooled["value"] <= pooled["high"]
            if s["metrics"][m]["n_skipped"] < 100:  # 8 bags per run: a few one-class resamples
                assert s["metrics"][m]["low"] <= s["metrics"][m]["mean"] + 1e-9
                assert s["metrics"][m]["mean"] <= s["metrics"][m]["high"] + 1e-9
        # composed studies carry tile truth: attention is scored against it
        assert s["attention"]["top1_hit"]["n"] == 2
        assert 0.0 <= s["ece"]["pooled"] <= 1.0
        assert "ci" in rec[0]["test_sets"][name]
    md = (out / "crossval.md").read_text()
    assert md.count("\n| test_10_") == 6 and md.count("\n| holdout_10_") == 6  # 2 sets x (bag, attention, calibration)
    assert "±" in md and "Youden" in md


def test_threshold_is_chosen_on_validation_and_applied_unchanged(tiny):
    _, _, out, summary, _ = tiny
    for f in (0, 1):
        fd = out / "seed_0" / f"fold_{f}"
        rec = json.loads((fd / "metrics.json").read_text())
        y, p, t = read_predictions(fd / "predictions_val.csv")
        expected = choose_threshold(y, p, "youden")
        assert rec["threshold"] == expected != 0.5
        assert np.all(t == expected)
        for name in rec["test_sets"]:
            yt, pt, tt = read_predictions(fd / f"predictions_{name}.csv")
            assert np.all(tt == expected)
            assert rec["test_sets"][name]["threshold"] == expected
            tp = int(((pt >= expected) & (yt == 1)).sum())
            assert rec["test_sets"][name]["confusion_matrix"][1][1] == tp
        assert read_checkpoint_dict(fd / "model" / "model.pt")["extra"]["threshold"] == expected
        assert summary["runs"][f]["threshold"] == expected


def test_no_patient_in_two_roles_and_holdout_untouched(tiny):
    _, cfg, out, _, _ = tiny
    table = read_tile_table(cfg.tiles, split_col="split")
    holdout = {p for p, s in zip(table.patients, table.splits) if s == "test"}
    assert set(json.loads((out / "holdout.json").read_text())["patients"]) == holdout
    tested = []
    for f in (0, 1):
        fd = out / "seed_0" / f"fold_{f}"
        roles = json.loads((fd / "metrics.json").read_text())["patients"]
        assert not holdout & set(roles["train"] + roles["val"] + roles["test"])
        check_no_leak(roles)
        tested += roles["test"]
        composed = composed_patients(fd / "bags")  # the patients actually inside the bags
        for role, got in composed.items():
            assert got <= set(roles[role])
    assert sorted(tested) == sorted(set(table.patients) - holdout)
    assert composed_patients(out / "seed_0" / "holdout" / "bags")["test"] <= holdout


def test_resume_skips_finished_folds(tiny, tmp_path):
    cfg_path, cfg, out, summary, _ = tiny
    run = tmp_path / "out"
    shutil.copytree(out, run, symlinks=True)
    stamps = {f: (run / "seed_0" / f"fold_{f}" / "metrics.json").stat().st_mtime_ns for f in (0, 1)}
    lines: list[str] = []
    again = run_crossval(cfg, run, log=lines.append)
    assert sum("finished earlier, skipped" in ln for ln in lines) == 2
    assert {f: (run / "seed_0" / f"fold_{f}" / "metrics.json").stat().st_mtime_ns for f in (0, 1)} == stamps
    assert again["test_sets"] == summary["test_sets"]
    # an unfinished fold (no metrics.json) is redone: same bags, same training, same result
    def history(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path))]

    before = history(run / "seed_0" / "fold_1" / "model" / "history.csv")
    (run / "seed_0" / "fold_1" / "metrics.json").unlink()
    lines.clear()
    pruning = cfg.model_copy(update={"prune_bags": True})  # a setting that may change on resume
    redo = run_crossval(pruning, run, log=lines.append)
    assert sum("skipped" in ln for ln in lines) == 1
    assert history(run / "seed_0" / "fold_1" / "model" / "history.csv") == before
    bags = run / "seed_0" / "fold_1" / "bags"
    assert sorted(p.name for p in (bags / "train").iterdir()) == ["labels.csv", "targets.csv", "tiles.csv"]
    assert (bags / "study.json").is_file() and (run / "seed_0" / "fold_0" / "bags" / "train" / "0").is_dir()
    # a pruned fold that has to be redone is composed again, identically
    (run / "seed_0" / "fold_1" / "metrics.json").unlink()
    again2 = run_crossval(pruning, run, log=lines.append)
    assert again2["runs"][1]["threshold"] == summary["runs"][1]["threshold"]
    assert redo["runs"][1]["threshold"] == summary["runs"][1]["threshold"]
    assert redo["test_sets"]["test_10_5"]["metrics"]["roc_auc"] == summary["test_sets"]["test_10_5"]["metrics"]["roc_auc"]
    # a setting that changes results may not change under a resumed run
    changed = load_crossval_config(cfg_path, {"study.train_bags": 20})
    with pytest.raises(HistomilError, match=r"different config \(study.train_bags changed\)"):
        run_crossval(changed, run, log=lines.append)


def test_cli_prints_the_table_and_reports_errors_in_one_line(tiny, tmp_path):
    cfg_path, _, out, _, _ = tiny
    app = typer.Typer()
    app.command("crossval")(crossval_cmd)
    app.command("other")(lambda: None)  # two commands, so 'crossval' is addressed by name as in the real CLI
    runner = CliRunner()
    run = tmp_path / "out"
    shutil.copytree(out, run, symlinks=True)
    result = runner.invoke(app, ["crossval", str(cfg_path), "--out", str(run), "--set", "bootstrap_resamples=200"])
    assert result.exit_code == 0, result.output
    assert "| test_10_5 |" in result.output and "balanced_accuracy" in result.output
    result = runner.invoke(app, ["crossval", str(cfg_path), "--out", str(run), "--set", "folds=3"])
    assert result.exit_code == 2
    assert "folds changed" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["crossval", str(cfg_path), "--out", str(run), "--set", "nonsense"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output

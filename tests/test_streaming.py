"""Lazy feature bags and streamed training (cohorts that do not fit in memory)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histomil.errors import HistomilError
from histomil.features.formats import load_features_folder
from histomil.features.lazy import LazyFeatureBag, in_memory_bytes, lazy_features_folder, scan_feature_bag
from histomil.features.store import FeatureBag, write_feature_bag
from histomil.training.streaming import BagTensors, bag_lengths, bag_tensors, peak_memory
from toy_bags import make_bags


def write_folder(folder: Path, bags: list[FeatureBag]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for b in bags:
        write_feature_bag(folder / f"{b.bag_id}.h5", b)
    return folder


def test_lazy_folder_matches_eager_without_holding_features(tmp_path: Path) -> None:
    bags, _ = make_bags(6, seed=3)
    folder = write_folder(tmp_path / "f", bags)
    eager = load_features_folder(folder)
    lazy = lazy_features_folder(folder)
    assert all(isinstance(b, LazyFeatureBag) for b in lazy)
    assert [b.bag_id for b in lazy] == [b.bag_id for b in eager]
    for e, z in zip(eager, lazy):
        assert z.label == e.label and z.shape == e.features.shape and len(z) == len(e)
        assert z.attrs == e.attrs and z.tile_paths == e.tile_paths
        np.testing.assert_array_equal(z.features, e.features)
        assert "features" not in vars(z)  # nothing cached on the bag
    assert in_memory_bytes(lazy) == sum(e.features.nbytes for e in eager)


def test_lazy_bag_refuses_a_file_changed_after_the_scan(tmp_path: Path) -> None:
    bags, _ = make_bags(1, seed=3)
    folder = write_folder(tmp_path / "f", bags)
    lazy = scan_feature_bag(folder / "b0.h5")
    write_feature_bag(folder / "b0.h5", FeatureBag("b0", np.zeros((3, 16), np.float32), ["a", "b", "c"], label=0))
    with pytest.raises(HistomilError, match="changed since"):
        _ = lazy.features


def test_scan_checks_values_before_training(tmp_path: Path) -> None:
    bags, _ = make_bags(2, seed=3)
    folder = write_folder(tmp_path / "f", bags)
    with h5py.File(folder / "b1.h5", "r+") as f:
        f["features"][0, 0] = np.nan
    with pytest.raises(HistomilError, match="b1.h5.*NaN"):
        lazy_features_folder(folder)


def test_bag_tensors_reads_ahead_in_planned_order_and_answers_any_order(tmp_path: Path) -> None:
    bags, _ = make_bags(7, seed=4)
    folder = write_folder(tmp_path / "f", bags)
    lazy = lazy_features_folder(folder)
    eager = load_features_folder(folder)
    assert isinstance(bag_tensors(eager), list)
    stream = bag_tensors([eager[0], *lazy[1:]], prefetch=2)  # mixed: in-memory bags stay in memory
    assert isinstance(stream, BagTensors)
    assert bag_lengths(stream) == [len(b) for b in eager]
    order = [3, 1, 6, 0, 2, 5, 4, 3]
    stream.plan(order)
    for i in order:
        assert torch.equal(stream[i], torch.from_numpy(eager[i].features))
    stream.plan([5, 6])
    assert torch.equal(stream[2], torch.from_numpy(eager[2].features))  # off plan: read directly
    assert torch.equal(stream[6], torch.from_numpy(eager[6].features))
    stream.close()


def test_bag_tensors_raises_a_read_error_in_the_training_thread(tmp_path: Path) -> None:
    bags, _ = make_bags(3, seed=4)
    folder = write_folder(tmp_path / "f", bags)
    stream = bag_tensors(lazy_features_folder(folder))
    os.remove(folder / "b1.h5")
    stream.plan([0, 1, 2])
    assert stream[0].shape[0] == len(bags[0].features)
    with pytest.raises(HistomilError, match="b1.h5"):
        stream[1]
    stream.close()


def test_peak_memory_reports_resident_megabytes() -> None:
    mem = peak_memory("cpu")
    assert set(mem) == {"peak_rss_mib"} and 10 < mem["peak_rss_mib"] < 10**6


def test_streamed_training_equals_in_memory_training(tmp_path: Path) -> None:
    """Same bags from files, lazily or in memory: the same history (max_instances sub-sampling included)."""
    from histomil.training.trainer import TrainConfig, train

    train_bags, _ = make_bags(24, seed=1)
    val_bags, _ = make_bags(10, seed=2, prefix="v")
    tr, va = write_folder(tmp_path / "train", train_bags), write_folder(tmp_path / "val", val_bags)
    cfg = TrainConfig(model="gated_abmil", epochs=3, min_epochs=0, batch_size=2, max_instances=6, seed=5)
    eager = train(load_features_folder(tr), load_features_folder(va), cfg, tmp_path / "eager")
    lazy = train(lazy_features_folder(tr), lazy_features_folder(va), cfg, tmp_path / "lazy")
    cols = [c for c in eager.history[0] if c != "seconds"]
    assert [[r[c] for c in cols] for r in lazy.history] == [[r[c] for c in cols] for r in eager.history]
    a = torch.load(eager.model_path, weights_only=False)["state_dict"]
    b = torch.load(lazy.model_path, weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming the in-memory run with the lazy bags finds the same data (the fingerprint is the features' digest)
    again = train(lazy_features_folder(tr), lazy_features_folder(va), cfg.model_copy(update={"epochs": 4}),
                  tmp_path / "eager", resume=True)
    assert again.epochs_run == 4 and again.history[:3] == eager.history


def test_cohort_memory_benchmark_runs_tiny(tmp_path: Path) -> None:
    """benchmarks/cohort_memory.py end to end at toy size (its numbers are the benchmark's, not checked here)."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cohort_memory.py"
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "data"), "--slides", "4", "--eager-slides", "4",
                    "--val", "2", "--tiles", "20", "40", "--dim", "8", "--max-instances", "16", "--repeats", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    runs = json.loads((out / "cohort_memory.json").read_text())["runs"]
    assert [(r["mode"], r["slides"]) for r in runs] == [("stream", 4), ("memory", 4)]
    assert runs[0]["val_loss"] == pytest.approx(runs[1]["val_loss"], abs=1e-6)  # same training either way
    assert "| stream | 4 |" in (out / "cohort_memory.md").read_text()


def test_predict_streams_lazy_bags_and_uses_every_tile(tmp_path: Path) -> None:
    from histomil.models.registry import build_model
    from histomil.training.trainer import predict

    bags, _ = make_bags(9, seed=6)
    folder = write_folder(tmp_path / "f", bags)
    torch.manual_seed(0)
    model = build_model("gated_abmil", 16, 2)
    eager = predict(model, load_features_folder(folder), batch_size=4)
    lazy = predict(model, lazy_features_folder(folder), batch_size=4)
    for (p1, a1), (p2, a2), b in zip(eager, lazy, bags):
        assert len(a2) == len(b)  # attention over every tile: inference never sub-samples
        np.testing.assert_allclose(p2, p1, atol=1e-6)
        np.testing.assert_allclose(a2, a1, atol=1e-6)
    with pytest.raises(HistomilError, match="no tiles"):
        predict(model, [np.zeros((0, 16), np.float32)])


def test_streamed_patient_bags_equal_in_memory_ones(tmp_path: Path) -> None:
    from cohort_data import write_cohort

    from histomil.data.cohort import load_slide_features, match_feature_files, patient_bag, read_cohort
    from histomil.features.lazy import LazyCombinedBag

    table, feats, slides_of = write_cohort(tmp_path, n_patients=4)
    cohort = match_feature_files(read_cohort(table, "label"), feats, "error")
    eager, lazy = load_slide_features(cohort), load_slide_features(cohort, stream=True)
    patient = next(p for p, s in slides_of.items() if len(s) > 1)
    a = patient_bag(patient, [eager[s] for s in slides_of[patient]], 1)
    b = patient_bag(patient, [lazy[s] for s in slides_of[patient]], 1)
    assert isinstance(b, LazyCombinedBag) and b.shape == a.features.shape and b.label == 1
    np.testing.assert_array_equal(b.features, a.features)
    np.testing.assert_array_equal(b.coords, a.coords)
    np.testing.assert_array_equal(b.attrs["slide_of_tile"], a.attrs["slide_of_tile"])
    assert b.tile_paths == a.tile_paths and b.attrs["slides"] == a.attrs["slides"]


def test_cohort_crossval_streamed_gives_the_in_memory_results(tmp_path: Path) -> None:
    import json

    from cohort_data import write_cohort
    from feature_files import invoke

    table, feats, _ = write_cohort(tmp_path)
    args = ["crossval", "--table", table, "--features", feats, "--target", "label", "--folds", "3", "--epochs", "4",
            "--set", "train.min_epochs=2", "--set", "bootstrap_resamples=0", "--set", "report=false"]
    for mode in ("off", "on"):
        result = invoke(*args, "--stream", mode, "--out", tmp_path / mode)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "on" / "oof_predictions.csv").read_text() == (tmp_path / "off" / "oof_predictions.csv").read_text()
    inputs = [json.loads((tmp_path / m / "inputs.json").read_text())["features_digest"] for m in ("off", "on")]
    assert inputs[0] == inputs[1]  # the same data identity whichever way the slides are read

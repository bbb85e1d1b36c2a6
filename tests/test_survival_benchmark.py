"""benchmarks/survival_synthetic.py on a tiny cohort of the example tiles (fast stand-in encoder): it runs,
and its table puts each model's c-index beside the oracle's computed from the same times."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_runs import FAST_ENCODER

from histomil.resources import example_tile_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import survival_synthetic  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_encoder", "one_thread")


def test_survival_benchmark_tiny_run(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    code = survival_synthetic.main([
        "--out", str(out), "--tiles", str(example_tile_table()), "--seeds", "0", "1", "--losses", "cox",
        "--epochs", "3", "--resamples", "5", "--train-bags", "40", "--val-bags", "20", "--test-bags-per-w", "4",
        "--bag-size", "10", "--encoder", FAST_ENCODER])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["loss"], r["seed"]) for r in data["results"]] == [("cox", 0), ("cox", 1)]
    for r in data["results"]:
        oracle = r["oracle"]["metrics"]["cindex_harrell"]
        assert 0.5 < oracle <= 1.0  # the true hazard ranks the bags
        assert r["model"]["n"] == 40 and (out / f"km_cox_seed{r['seed']}.png").is_file()
    table = (out / "results.md").read_text()
    assert f"{data['results'][0]['oracle']['metrics']['cindex_harrell']:.3f}" in table
    assert "cox: Harrell c-index model" in capsys.readouterr().out

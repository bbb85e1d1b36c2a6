"""The GPU benchmark script runs (on the CPU here, tiny sizes) and writes its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
EBHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ebhi"


def test_gpu_benchmark_quick_on_cpu(tmp_path):
    if not (EBHI / "tiles.csv").is_file():
        pytest.skip("the EBHI tiles are not beside the checkout")
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--encoders", "efficientnet_lite0",
                      "--models", "gated_abmil", "--precision", "fp32"])
    assert rc == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["environment"]["device"] == "cpu" and result["environment"]["precision"] == "fp32"
    (ext,), (mil,) = result["extraction"], result["mil"]
    assert ext["encoder"] == "efficientnet_lite0" and ext["dim"] == 1280
    assert ext["encoder_tiles_per_s"] > 0 and ext["pipeline_tiles_per_s"] > 0
    assert ext["pipeline_fraction"] == pytest.approx(ext["pipeline_tiles_per_s"] / ext["encoder_tiles_per_s"])
    assert mil["train_bags_per_s"] > 0 and mil["infer_bags_per_s"] > 0
    table = (tmp_path / "gpu.md").read_text()
    assert "| efficientnet_lite0 | shipped | 1280 | 224 |" in table and "| gated_abmil |" in table
    assert "random weights" in table
    assert module.markdown(result) == table  # --table re-renders a run's gpu.json to the same table


def test_committed_gpu_table_is_the_committed_run_rendered():
    """benchmarks/results/gpu/gpu.md (RESULTS.md section 7) is what `gpu.py --table` makes of the committed gpu.json."""
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = BENCH.parent / "results" / "gpu"
    result = json.loads((results / "gpu.json").read_text())
    assert result["environment"]["device_name"] == "NVIDIA H200"
    assert module.markdown(result) == (results / "gpu.md").read_text()

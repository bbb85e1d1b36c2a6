"""``crossval --table --features`` accepts every layout in ../shared/interop (files the tools' own code wrote)."""

from __future__ import annotations

import json
import shutil

import pytest
from feature_files import INTEROP, LAYOUTS, copy_layout, invoke

from histomil.data.cohort import load_slide_features, match_feature_files, read_cohort

pytestmark = pytest.mark.usefixtures("one_thread")
PATIENTS = 8  # 2 folds of 4 test patients; 2 training and 2 validation patients in each


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_interop_layout_is_accepted(tmp_path, layout):
    if not INTEROP.is_dir():
        pytest.fail(f"{INTEROP} is missing: the shared interop files must sit beside the checkout")
    cases = {f"slide-{i}": None for i in range(PATIENTS)}
    feats = copy_layout(layout, tmp_path / "tool", cases)
    table = tmp_path / "cohort.csv"
    table.write_text("slide,patient,label\n" + "".join(f"slide-{i},pat-{i},{'yes' if i % 2 else 'no'}\n" for i in range(PATIENTS)))
    # the table-level reader: the real file, read through features.formats, with its encoder identity
    cohort = match_feature_files(read_cohort(table, "label"), feats)
    bags = load_slide_features(cohort)
    first = bags["slide-0"]
    assert first.features.dtype.name == "float32" and first.features.shape[1] == 1024
    assert first.attrs["source_format"] in {"clam", "trident", "stamp", "pt"}
    if layout.startswith("trident"):
        assert first.attrs["encoder_canonical"] == "uni_v1"
    out = tmp_path / "cv"
    result = invoke("crossval", "--table", table, "--features", feats, "--target", "label", "--folds", 2, "--out", out,
                    "--epochs", 1, "--set", "train.min_epochs=0", "--set", "bootstrap_resamples=0", "--set", "report=false",
                    "--set", "train.model_kwargs={embed_dim: 16, attn_dim: 8}")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patients"] == PATIENTS and metrics["positive_class"] == "yes"
    assert sum(len(f["dir"]) > 0 for f in metrics["per_fold"]) == 2 and (out / "ensemble.pt").is_file()
    assert len((out / "oof_predictions.csv").read_text().splitlines()) == PATIENTS + 1
    if layout == "trident_h5_20x":  # the ensemble of the fold models draws a heatmap from the cached features
        slide = INTEROP.parent / "data" / "wsi" / "CMU-1-Small-Region.svs"
        result = invoke("heatmap", out / "ensemble.pt", slide, "--features", feats / "slide-0.h5", "--out", tmp_path / "hm")
        assert result.exit_code == 0, result.output
        assert (tmp_path / "hm" / "heatmaps" / "CMU-1-Small-Region_heatmap.png").stat().st_size > 1000
    shutil.rmtree(out)

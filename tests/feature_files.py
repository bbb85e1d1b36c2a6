"""Helpers for the CLI tests on feature files: the real CLAM/TRIDENT/STAMP files of ../shared/interop
copied into a writable folder under case names, random histomil feature folders, and a tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from histomil.cli import app
from histomil.features.store import FeatureBag, write_feature_bag

INTEROP = Path(__file__).resolve().parents[1].parent / "shared" / "interop"
DIM = 1024
runner = CliRunner()

#: layout -> (run folder under interop/, features sub-folder, slide stem, patches file name pattern or None)
LAYOUTS: dict[str, tuple[str, str, str, str | None]] = {
    "clam_h5": ("clam/level0_step256", "h5_files", "CMU-1-Small-Region", "{}.h5"),
    "clam_h5_step128": ("clam/level0_step128", "h5_files", "CMU-1-Small-Region", "{}.h5"),
    "clam_h5_level1": ("clam/level1_tcga", "h5_files", "TCGA-CR-7395-01A-01-TS1", "{}.h5"),
    "clam_pt": ("clam/level0_step256", "pt_files", "CMU-1-Small-Region", "{}.h5"),
    "trident_h5_20x": ("trident/20x_256px_0px_overlap", "features_uni_v1", "CMU-1-Small-Region", "{}_patches.h5"),
    "trident_h5_10x": ("trident/10x_256px_0px_overlap", "features_uni_v1", "CMU-1-Small-Region", "{}_patches.h5"),
    "trident_pt": ("trident/10x_256px_0px_overlap", "features_uni_v1_pt", "CMU-1-Small-Region", "{}_patches.h5"),
    "stamp_256um": ("stamp/tile256um", "uni-random-49b04e14", "CMU-1-Small-Region", None),
    "stamp_128um": ("stamp/tile128um", "uni-random-49b04e14", "CMU-1-Small-Region", None),
}


def invoke(*args: object):
    """Run the real CLI in-process; ``result.output`` holds stdout and stderr."""
    return runner.invoke(app, [str(a) for a in args])


def copy_layout(layout: str, dest: Path, cases: dict[str, int | None]) -> Path:
    """The tool's output for one slide, copied to ``dest`` once per case (its files renamed to the case),
    with the tool's patches files beside it and ``labels.csv`` beside the feature files; returns the
    feature folder."""
    run, sub, stem, patches = LAYOUTS[layout]
    src = INTEROP / run
    feat_src = next(p for p in (src / sub).iterdir() if p.stem == stem)
    feat_dir = dest / sub
    feat_dir.mkdir(parents=True)
    for case in cases:
        shutil.copyfile(feat_src, feat_dir / f"{case}{feat_src.suffix}")
        if patches is not None:
            (dest / "patches").mkdir(exist_ok=True)
            shutil.copyfile(src / "patches" / patches.format(stem), dest / "patches" / patches.format(case))
    labelled = {c: y for c, y in cases.items() if y is not None}
    if labelled:
        (feat_dir / "labels.csv").write_text("case,y_true\n" + "".join(f"{c},{y}\n" for c, y in labelled.items()))
    return feat_dir


def random_bags(folder: Path, labels: dict[str, int], encoder: str | None = "uni_v1", seed: int = 0,
                dim: int = DIM, n_tiles: int = 12) -> Path:
    """Histomil feature files of random ``dim``-d features, labelled only by a labels.csv beside them
    (positive bags get a shifted block of tiles, so a model can learn something)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for case, y in labels.items():
        feats = rng.normal(size=(n_tiles, dim)).astype(np.float32)
        if y:
            feats[:3] += 1.0
        attrs = {"encoder": encoder} if encoder else {}
        write_feature_bag(folder / f"{case}.h5", FeatureBag(case, feats, [f"t{i}.png" for i in range(n_tiles)], None,
                                                           attrs=attrs))
    (folder / "labels.csv").write_text("case,y_true\n" + "".join(f"{c},{y}\n" for c, y in labels.items()))
    return folder


def train_tiny(train: Path, val: Path, out: Path) -> Path:
    """Train a small attention model for two epochs via the CLI; returns its model.pt."""
    result = invoke("train", train, "--val", val, "--out", out, "--model", "abmil", "--epochs", 2, "--min-epochs", 1,
                    "--patience", 1)
    assert result.exit_code == 0, result.output
    return out / "model.pt"

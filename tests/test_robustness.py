"""The default training recipe is not on a knife edge: features that differ by bf16 rounding (another
CPU kind, another precision) train a demo-sized model to the same test accuracy.

Another machine's features are not the same floats: bf16 kernels differ between AMX and AVX512-BF16
CPUs, and fp32 between runtimes. With the old recipe (no label smoothing, logits pushed to +-20) such
a difference flipped whole test sets to accuracy ~0.56 at AUC 1.0. Here the cached features of the
shipped demo study are perturbed by relative noise of bf16's rounding size (2^-8), a model is trained
on each version with the demo recipe, and every test set's accuracy must agree within 0.02.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histomil.data.compose import compose_study
from histomil.data.tile_table import read_tile_table
from histomil.features.formats import load_feature_dataset
from histomil.features.store import FeatureBag
from histomil.pipeline import FeatureConfig, extract_study, load_config
from histomil.resources import demo_config_path
from histomil.training.checkpoint import load_checkpoint
from histomil.training.trainer import predict, train

TESTS = ("test_40_20", "test_40_10", "test_40_5", "test_40_1")
BF16_RELATIVE = 2.0**-8


def reduced_demo_study(root: Path) -> tuple[Path, object]:
    """The demo study with fewer bags (so that two trainings fit in the suite), composed and extracted
    under ``root`` once (a finished study is reused); returns its feature folder and the run config."""
    cfg = load_config(demo_config_path(), {"study.train_bags": 200, "study.val_bags": 60, "study.test_bags": 100})
    if not (root / "bags" / "study.json").is_file():
        c = cfg.columns
        compose_study(read_tile_table(cfg.tiles, c.path, c.label, c.patient, c.split), cfg.study, root / "bags")
    extract_study(root / "bags", root / "features", FeatureConfig(precision="auto", batch_size=64))
    return root / "features", cfg


@pytest.fixture(scope="module")
def demo_features(tmp_path_factory) -> tuple[Path, object]:
    return reduced_demo_study(tmp_path_factory.mktemp("demo_study"))


def _perturbed(bags: list[FeatureBag], rng: np.random.Generator) -> list[FeatureBag]:
    out = []
    for b in bags:
        noise = rng.uniform(-BF16_RELATIVE, BF16_RELATIVE, size=b.features.shape).astype(np.float32)
        out.append(FeatureBag(bag_id=b.bag_id, features=b.features * (1 + noise), tile_paths=b.tile_paths,
                              label=b.label, attrs=b.attrs))
    return out


def train_and_test_accuracies(feat_dir: Path, cfg, out: Path, rng: np.random.Generator | None) -> dict[str, float]:
    splits = {n: load_feature_dataset(feat_dir / n, require_labels=True) for n in ("train", "val", *TESTS)}
    if rng is not None:
        splits = {n: _perturbed(bags, rng) for n, bags in splits.items()}
    train_cfg = cfg.train.model_copy(update={"epochs": 15})  # the demo recipe, with a shorter epoch budget
    result = train(splits["train"], splits["val"], train_cfg, out)
    model, meta = load_checkpoint(result.model_path)
    threshold = float(meta.get("threshold", 0.5))
    acc = {}
    for name in TESTS:
        y = np.array([b.label for b in splits[name]])
        p = np.array([pr[1] for pr, _ in predict(model, splits[name])])
        acc[name] = float(np.mean((p >= threshold) == y))
    return acc


def test_bf16_sized_feature_noise_moves_test_accuracy_by_less_than_002(demo_features, tmp_path) -> None:
    feat_dir, cfg = demo_features
    clean = train_and_test_accuracies(feat_dir, cfg, tmp_path / "clean", None)
    noisy = train_and_test_accuracies(feat_dir, cfg, tmp_path / "noisy", np.random.default_rng(7))
    for name in TESTS:
        assert abs(clean[name] - noisy[name]) < 0.02, (name, clean, noisy)
        # and good, not merely stable: the old recipe (no label smoothing) gave 0.94 at W = 1 here (seed 0),
        # and with seeds 1 / 2 moved by 0.05 under this noise or fell to 0.89 (benchmarks/RESULTS.md)
        assert min(clean[name], noisy[name]) >= 0.95, (name, clean, noisy)

"""A small, learnable slide cohort for the cohort tests: per-slide histomil feature files and a cohort CSV.

Patients have 1-3 slides of 20-60 tiles x 32-d Gaussian features; a positive patient's slides carry a
few tumour tiles whose features are shifted along one direction, so attention MIL learns it in a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histomil.features.store import FeatureBag, write_feature_bag

DIM = 32


def write_cohort(root: Path, n_patients: int = 12, seed: int = 0, encoder: str = "toy_encoder",
                 classes: tuple[str, str] = ("normal", "tumor"), shift: float = 3.0) -> tuple[Path, Path, dict[str, list[str]]]:
    """(cohort.csv, feature folder, patient -> slides). Patients alternate negative / positive."""
    rng = np.random.default_rng(seed)
    feat_dir = root / "slide_features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    direction = np.zeros(DIM, dtype=np.float32)
    direction[:4] = shift
    rows = ["slide,patient,label"]
    slides_of: dict[str, list[str]] = {}
    for i in range(n_patients):
        patient = f"P{i:02d}"
        positive = i % 2 == 1
        n_slides = 1 + (i * 7 % 3)  # 1, 2 or 3 slides
        slides_of[patient] = []
        for j in range(n_slides):
            slide = f"{patient}-S{j}"
            n = int(rng.integers(20, 61))
            feats = rng.normal(0.0, 1.0, size=(n, DIM)).astype(np.float32)
            if positive:
                k = max(2, n // 8)
                feats[rng.choice(n, size=k, replace=False)] += direction
            coords = np.stack([np.arange(n) % 8 * 256, np.arange(n) // 8 * 256], axis=1)
            bag = FeatureBag(bag_id=slide, features=feats, tile_paths=[f"{x}_{y}" for x, y in coords.tolist()],
                             coords=coords, attrs={"encoder": encoder})
            write_feature_bag(feat_dir / f"{slide}.h5", bag)
            rows.append(f"{slide},{patient},{classes[int(positive)]}")
            slides_of[patient].append(slide)
    table = root / "cohort.csv"
    table.write_text("\n".join(rows) + "\n")
    return table, feat_dir, slides_of

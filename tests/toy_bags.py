"""The toy witness problem on feature bags, shared by the trainer and model-zoo tests."""

from __future__ import annotations

import numpy as np

from histomil.features.store import FeatureBag

D = 16  # feature dimension of the toy bags


def make_bags(n: int, seed: int, shift: float = 3.0, prefix: str = "b") -> tuple[list[FeatureBag], list[int]]:
    """Bags of 4-15 N(0, 1) tiles; positive bags hold one witness tile shifted by ``shift`` in 2 of the
    D dims (weak enough that an untrained model scores AUC ~0.5). Returns bags and witness indices."""
    rng = np.random.default_rng(seed)
    bags, witness = [], []
    for i in range(n):
        size = int(rng.integers(4, 16))
        feats = rng.normal(size=(size, D)).astype(np.float32)
        label = i % 2
        w = -1
        if label:
            w = int(rng.integers(size))
            feats[w, :2] += shift
        bags.append(FeatureBag(f"{prefix}{i}", feats, [f"t{j}" for j in range(size)], label=label, attrs={}))
        witness.append(w)
    return bags, witness


def toy_problem() -> tuple[list[FeatureBag], list[FeatureBag], list[int]]:
    """80 training bags (seed 1), 40 validation bags (seed 2, ids v0..) and the validation witness indices."""
    train_bags, _ = make_bags(80, seed=1)
    val_bags, val_witness = make_bags(40, seed=2, prefix="v")
    return train_bags, val_bags, val_witness

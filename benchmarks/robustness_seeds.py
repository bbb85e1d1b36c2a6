"""The robustness test (tests/test_robustness.py) over several seeds and label-smoothing values.

Trains the demo recipe on the reduced demo study (200 training bags, 15 epochs at most) twice per seed,
on clean features and on features with relative uniform noise of bf16's rounding size (2^-8), and prints
each test set's accuracy for both:

    python benchmarks/robustness_seeds.py --out runs/robustness --eps 0.0 0.1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_robustness as robustness  # noqa: E402  (the test's own study and training)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args(argv)
    features, cfg = robustness.reduced_demo_study(a.out)
    for eps in a.eps:
        for seed in a.seeds:
            cfg.train = cfg.train.model_copy(update={"label_smoothing": eps, "seed": seed})
            clean = robustness.train_and_test_accuracies(features, cfg, a.out / f"clean_{eps}_{seed}", None)
            noisy = robustness.train_and_test_accuracies(features, cfg, a.out / f"noisy_{eps}_{seed}", np.random.default_rng(7))
            print(f"label_smoothing {eps} seed {seed}: clean {clean} noisy {noisy}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

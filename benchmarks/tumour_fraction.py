"""Regression of the tumour fraction W/40 of bags composed from real EBHI tiles, over several seeds.

Tiles: EBHI-Seg adenocarcinoma (tumour) and normal + polyp (non-tumour) tiles, encoded once with
EfficientNet-Lite0 (the cache of ``benchmarks/ebhi_subtyping.py`` is shared when ``--out`` is the
same). Per seed: patients are split 60/20/20 into train / val / test (no patient in two splits);
each bag holds 40 tiles of its split's patients, W of them tumour with W drawn uniformly from 0..40,
so its target W/40 is known exactly (the composition of :mod:`histomil.data.compose`, done here on
the tiles' features). 400 training, 100 validation and 300 test bags. A regression MIL model
(``task: regression``, MSE on the standardised target, early stopping on the validation loss) is
trained, and its test predictions are scored with
:func:`histomil.evaluation.task_metrics.regression_metrics` (bootstrap CIs over bags), next to the
baseline that predicts the training mean.

    nice python benchmarks/tumour_fraction.py --out runs/ebhi_subtyping --seeds 0 1 2

Writes ``fraction_results.json``, ``fraction_results.md`` and ``fraction_scatter_seed<S>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_text  # noqa: E402
from ebhi_subtyping import EBHI, encode, patient_class_bags  # noqa: E402

from histomil.evaluation.task_metrics import regression_metrics  # noqa: E402
from histomil.features.formats import load_features_folder  # noqa: E402
from histomil.features.store import FeatureBag  # noqa: E402
from histomil.reports.task_plots import plot_regression_scatter  # noqa: E402
from histomil.training.checkpoint import load_checkpoint  # noqa: E402
from histomil.training.tasks import regression_scores, task_from_checkpoint  # noqa: E402
from histomil.training.trainer import TrainConfig, predict, train  # noqa: E402

BAG_SIZE = 40
SIZES = {"train": 400, "val": 100, "test": 300}
METRICS = ("mae", "rmse", "r2", "pearson", "spearman")


def tile_features(tiles_csv: Path, features: Path) -> dict[str, list[tuple[str, int, np.ndarray]]]:
    """Patient -> [(tile path, tumour 0/1, feature vector)] of the tiles with a tumour label."""
    tumour = {}
    with open(tiles_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["tumor"] in ("0", "1"):
                tumour[str(tiles_csv.parent / row["path"])] = (row["case_id"], int(row["tumor"]))
    by_patient: dict[str, list[tuple[str, int, np.ndarray]]] = {}
    for bag in load_features_folder(features, require_labels=True):
        for path, feat in zip(bag.tile_paths, bag.features):
            if path in tumour:
                case, label = tumour[path]
                by_patient.setdefault(case, []).append((path, label, feat))
    return by_patient


def compose(by_patient: dict[str, list], seed: int) -> dict[str, list[FeatureBag]]:
    """Bags of 40 tiles per split, W ~ U{0..40} tumour tiles each; target W/40; patients split 60/20/20."""
    rng = np.random.default_rng(seed)
    patients = sorted(by_patient)
    order = rng.permutation(len(patients))
    cut = [int(0.6 * len(patients)), int(0.8 * len(patients))]
    roles = {"train": order[: cut[0]], "val": order[cut[0]: cut[1]], "test": order[cut[1]:]}
    out = {}
    for split, idx in roles.items():
        tiles = [t for i in idx for t in by_patient[patients[i]]]
        pos = [t for t in tiles if t[1] == 1]
        neg = [t for t in tiles if t[1] == 0]
        if len(pos) < BAG_SIZE or len(neg) < BAG_SIZE:
            raise SystemExit(f"seed {seed}: split {split} has {len(pos)} tumour and {len(neg)} other tiles; need {BAG_SIZE} of each")
        bags = []
        for b in range(SIZES[split]):
            w = int(rng.integers(0, BAG_SIZE + 1))
            chosen = [pos[i] for i in rng.choice(len(pos), w, replace=False)] + \
                     [neg[i] for i in rng.choice(len(neg), BAG_SIZE - w, replace=False)]
            chosen = [chosen[i] for i in rng.permutation(BAG_SIZE)]
            bags.append(FeatureBag(f"{split}_{b:04d}", np.stack([t[2] for t in chosen]), [t[0] for t in chosen],
                                   target=(w / BAG_SIZE,)))
        out[split] = bags
    return out


def run_seed(by_patient: dict[str, list], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    sets = compose(by_patient, seed)
    y_test = np.array([b.target[0] for b in sets["test"]])
    baseline = np.full_like(y_test, np.mean([b.target[0] for b in sets["train"]]))
    row: dict[str, Any] = {"seed": seed, "baseline": regression_scores(y_test, baseline), "models": {}}
    scatter = {}
    for model_name in args.models:
        cfg = TrainConfig(task="regression", model=model_name, epochs=args.epochs, min_epochs=10, patience=10,
                          lr=5e-4, batch_size=8, seed=seed)
        t0 = time.perf_counter()
        result = train(sets["train"], sets["val"], cfg, args.out / "fraction" / f"{model_name}_seed{seed}")
        model, meta = load_checkpoint(result.model_path)
        pred = np.array([p[0] for p, _ in predict(model, sets["test"], task=task_from_checkpoint(meta))])
        metrics = regression_metrics(y_test, pred, n_resamples=args.resamples, seed=seed)
        row["models"][model_name] = {"metrics": metrics, "best_epoch": result.best_epoch,
                                     "seconds": round(time.perf_counter() - t0, 1)}
        scatter[model_name] = (y_test, pred)
        print(f"seed {seed} {model_name}: MAE {metrics['mae']['value']:.4f}, Spearman {metrics['spearman']['value']:.4f}, "
              f"R2 {metrics['r2']['value']:.4f} (best epoch {result.best_epoch}, {row['models'][model_name]['seconds']} s)", flush=True)
    plot_regression_scatter(scatter, args.out / f"fraction_scatter_seed{seed}.png", title=f"tumour fraction W/40, test bags, seed {seed}")
    return row


def markdown(runs: list[dict[str, Any]], models: list[str], seconds: float) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for m in models:
        cells = []
        for k in METRICS:
            v = np.array([r["models"][m]["metrics"][k]["value"] for r in runs])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else float('nan'):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    cells = []
    for k in METRICS:  # a constant prediction has no correlation (NaN -> n/a)
        v = np.array([r["baseline"][k] for r in runs])
        cells.append("n/a" if not np.all(np.isfinite(v)) else f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else float('nan'):.3f}")
    lines.append("| training mean (baseline) | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, value [95% bootstrap CI over the 300 test bags]:", "",
              "| seed | model | MAE | Spearman | R² |", "|---|---|---:|---:|---:|"]
    for r in runs:
        for m in models:
            mm = r["models"][m]["metrics"]
            lines.append(f"| {r['seed']} | {m} | " + " | ".join(
                f"{mm[k]['value']:.3f} [{mm[k]['low']:.3f}, {mm[k]['high']:.3f}]" for k in ("mae", "spearman", "r2")) + " |")
    lines += ["", f"Wall time {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ebhi_subtyping"))
    parser.add_argument("--tiles", type=Path, default=EBHI / "tiles.csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["gated_abmil", "mean_pool"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    t0 = time.perf_counter()
    raw_bags, _ = patient_class_bags(args.tiles)
    by_patient = tile_features(args.tiles, encode(raw_bags, args.out))
    runs = [run_seed(by_patient, s, args) for s in args.seeds]
    seconds = time.perf_counter() - t0
    write_json(args.out / "fraction_results.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                                    "runs": runs, "seconds": seconds})
    text = markdown(runs, args.models, seconds)
    write_text(args.out / "fraction_results.md", text)
    print(text)


if __name__ == "__main__":
    main()

"""Six-class subtyping of real EBHI-Seg tissue: patient-grouped cross-validation over several seeds.

A bag is the tiles of one patient in one tissue class (most patients have one class; a patient with
tiles of two or three classes gives one bag per class, always in the same fold, so no patient is in
training and test). Label = the class, in the order Normal, Polyp, Low-grade IN, High-grade IN,
Serrated adenoma, Adenocarcinoma. Tiles are encoded once with EfficientNet-Lite0 (``precision
auto``). For each seed: 5 patient-grouped folds stratified on the class (StratifiedGroupKFold with
that seed); inside each training fold ~15% of the patients (stratified) are the validation set for
early stopping on the validation loss; gated-attention MIL (batches of 8 bags, class-weighted cross-entropy, label
smoothing 0.1) is trained and predicts the fold's test bags. The out-of-fold predictions of one seed
(every bag predicted once, by the model that never saw its patient) are scored together with
:func:`histomil.evaluation.task_metrics.multiclass_metrics` (bootstrap CIs over bags), and the seeds are
summarised as mean ± sd.

    nice python benchmarks/ebhi_subtyping.py --out runs/ebhi_subtyping --seeds 0 1 2

Writes ``results.json``, ``results.md`` and ``confusion_seed<S>.png`` into ``--out``; features
(``--out/features``) and the tile cache are reused by a second run.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_text  # noqa: E402

from histomil.data.bags import Bag  # noqa: E402
from histomil.evaluation.splitting import grouped_stratified_folds, stratified_groups_split  # noqa: E402
from histomil.evaluation.task_metrics import multiclass_metrics  # noqa: E402
from histomil.features.cache import FeatureCache  # noqa: E402
from histomil.features.encoders import build_encoder  # noqa: E402
from histomil.features.extract import extract_bags  # noqa: E402
from histomil.features.formats import load_features_folder  # noqa: E402
from histomil.features.runtimes import with_runtime  # noqa: E402
from histomil.reports.plots import plot_confusion_matrix  # noqa: E402
from histomil.training.checkpoint import load_checkpoint  # noqa: E402
from histomil.training.tasks import task_from_checkpoint  # noqa: E402
from histomil.training.trainer import TrainConfig, predict, train  # noqa: E402

EBHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ebhi"
CLASSES = ("Normal", "Polyp", "Low-grade IN", "High-grade IN", "Serrated adenoma", "Adenocarcinoma")
HEADLINE = ("accuracy", "balanced_accuracy", "macro_roc_auc", "macro_pr_auc")


def patient_class_bags(tiles_csv: Path) -> tuple[list[Bag], dict[str, str]]:
    """One bag per (patient, tissue class) with all its tiles; returns the bags and bag id -> patient."""
    groups: dict[tuple[str, int], list[Path]] = defaultdict(list)
    with open(tiles_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            groups[(row["case_id"], CLASSES.index(row["tissue"]))].append(tiles_csv.parent / row["path"])
    bags, patient = [], {}
    for (case, label), paths in sorted(groups.items()):
        bag_id = f"{case}_c{label}"
        bags.append(Bag(bag_id, tuple(sorted(paths)), label))
        patient[bag_id] = case
    return bags, patient


def encode(bags: list[Bag], out: Path) -> Path:
    """Features of every bag (each distinct tile encoded once; reused when already there)."""
    encoder = with_runtime(build_encoder("efficientnet_lite0", precision="auto", channels_last=True), "auto")
    cache = FeatureCache.for_encoder(out / "cache", encoder)
    extract_bags(bags, out / "features", encoder, cache)
    return out / "features"


def train_config(seed: int, epochs: int, model: str) -> TrainConfig:
    return TrainConfig(model=model, epochs=epochs, min_epochs=10, patience=10, lr=5e-4, batch_size=8, seed=seed, class_weights=True,
                       task_options={"class_names": list(CLASSES)})


def run_seed(bags: list[Any], patient: dict[str, str], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Out-of-fold class probabilities of every bag for one seed, and their metrics."""
    labels = np.array([b.label for b in bags])
    groups = [patient[b.bag_id] for b in bags]
    folds = grouped_stratified_folds(labels, groups, args.folds, seed, "EBHI subtyping")
    probs = np.zeros((len(bags), len(CLASSES)))
    fold_rows = []
    for f, test_patients in enumerate(folds):
        test_idx = [i for i, g in enumerate(groups) if g in test_patients]
        rest = [i for i, g in enumerate(groups) if g not in test_patients]
        val_ids = stratified_groups_split([bags[i].bag_id for i in rest], labels[rest], 0.15, seed + f,
                                          groups=[groups[i] for i in rest], source="EBHI subtyping validation")
        train_bags = [bags[i] for i in rest if bags[i].bag_id not in val_ids]
        val_bags = [bags[i] for i in rest if bags[i].bag_id in val_ids]
        t0 = time.perf_counter()
        result = train(train_bags, val_bags, train_config(seed, args.epochs, args.model), args.out / f"seed{seed}" / f"fold{f}")
        model, meta = load_checkpoint(result.model_path)
        fold_probs = np.array([p for p, _ in predict(model, [bags[i] for i in test_idx], task=task_from_checkpoint(meta))])
        probs[test_idx] = fold_probs
        acc = float(np.mean(fold_probs.argmax(1) == labels[test_idx]))
        fold_rows.append({"fold": f, "n_train": len(train_bags), "n_val": len(val_bags), "n_test": len(test_idx),
                          "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "accuracy": acc,
                          "seconds": round(time.perf_counter() - t0, 1)})
        print(f"seed {seed} fold {f}: {len(test_idx)} test bags, accuracy {acc:.3f}, best epoch {result.best_epoch}, "
              f"{fold_rows[-1]['seconds']} s", flush=True)
    metrics = multiclass_metrics(labels, probs, list(CLASSES), n_resamples=args.resamples, seed=seed)
    plot_confusion_matrix(metrics["confusion_matrix"], args.out / f"confusion_seed{seed}.png",
                          title=f"EBHI six classes, out-of-fold, seed {seed}", class_names=[c.replace(" ", "\n") for c in CLASSES])
    return {"seed": seed, "folds": fold_rows, "metrics": metrics}


def markdown(runs: list[dict[str, Any]], counts: dict[str, Any], info: dict[str, Any]) -> str:
    """The RESULTS table: per seed value [95% CI], mean ± sd over seeds; per-class one-vs-rest AUCs."""
    lines = [f"Bags: {counts['bags']} (patients {counts['patients']}); per class {counts['per_class']}.", "",
             "| seed | " + " | ".join(HEADLINE) + " |", "|---|" + "---:|" * len(HEADLINE)]
    for r in runs:
        m = r["metrics"]
        lines.append(f"| {r['seed']} | " + " | ".join(f"{m[k]['value']:.3f} [{m[k]['low']:.3f}, {m[k]['high']:.3f}]"
                                                      for k in HEADLINE) + " |")
    values = {k: np.array([r["metrics"][k]["value"] for r in runs]) for k in HEADLINE}
    lines.append("| mean ± sd | " + " | ".join(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else float('nan'):.3f}"
                                               for v in values.values()) + " |")
    lines += ["", "| class | bags | ROC-AUC (mean over seeds) | PR-AUC | recall | ECE (one vs rest) |", "|---|---:|---:|---:|---:|---:|"]
    for c in CLASSES:
        per = [r["metrics"]["per_class"][c] for r in runs]
        lines.append(f"| {c} | {per[0]['n']} | {np.mean([p['roc_auc']['value'] for p in per]):.3f} | "
                     f"{np.mean([p['pr_auc']['value'] for p in per]):.3f} | {np.mean([p['recall'] for p in per]):.3f} | "
                     f"{np.mean([p['ece'] for p in per]):.3f} |")
    cm = np.sum([r["metrics"]["confusion_matrix"] for r in runs], axis=0)
    lines += ["", f"Confusion matrix summed over {len(runs)} seed(s) (rows true, columns predicted; order {', '.join(CLASSES)}):", ""]
    lines += ["    " + " ".join(f"{v:5d}" for v in row) for row in cm.tolist()]
    lines += ["", f"Wall time {info['seconds']:.0f} s (features {info['feature_seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ebhi_subtyping"))
    parser.add_argument("--tiles", type=Path, default=EBHI / "tiles.csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--model", default="gated_abmil")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    t0 = time.perf_counter()
    raw_bags, patient = patient_class_bags(args.tiles)
    features = encode(raw_bags, args.out)
    feature_seconds = time.perf_counter() - t0
    bags = load_features_folder(features, require_labels=True)
    counts = {"bags": len(bags), "patients": len(set(patient.values())),
              "per_class": {c: int(sum(b.label == k for b in bags)) for k, c in enumerate(CLASSES)}}
    runs = [run_seed(bags, patient, s, args) for s in args.seeds]
    info = {"seconds": time.perf_counter() - t0, "feature_seconds": feature_seconds}
    write_json(args.out / "results.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                           "counts": counts, "runs": runs, **info})
    text = markdown(runs, counts, info)
    write_text(args.out / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()

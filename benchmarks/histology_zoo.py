"""Histology model zoo: every feature-level model on the EBHI witness-rate study, several seeds.

The study is the original project's design on ../shared/data/ebhi (``configs/ebhi_original.yaml``):
bags of 40 tiles, 2,000 training bags at W = 20 witness (tumour) tiles, 100 validation bags, four
test sets of 1,000 bags at W = 20, 10, 5, 1, patients split 60/20/20 (test = patients never seen in
training or validation). Every model gets the same EfficientNet-Lite0 features, the same splits, the
same training options (``configs/compare_train.yaml``: batches of 16 bags, at most 12 epochs, early
stopping on validation loss) and the same seeds; the seed changes only the model's initialisation
and the batch order, not the study. Reported per test set: accuracy at threshold 0.5 and ROC-AUC,
mean ± standard deviation over seeds, plus mean training time.

    python benchmarks/histology_zoo.py --out benchmarks/results/

composes and extracts the study into ``--study`` when its features are missing (about 2-3 minutes),
then trains what is not yet in ``--runs`` (one folder per model and seed, so a stopped run resumes:
seeds run one after another, so an interrupted run still leaves whole seeds). Writes
``histology_zoo.json`` (per-seed results, summary, settings, machine) and ``histology_zoo.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_text

from histomil.config import read_mapping, validate
from histomil.data.compose import compose_study
from histomil.data.tile_table import read_tile_table
from histomil.errors import HistomilError
from histomil.evaluation.compare import compare_models
from histomil.pipeline import extract_study, load_config
from histomil.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ZOO = ("mean_pool", "max_pool", "mi_net", "abmil", "gated_abmil", "clam_sb", "clam_mb", "transmil", "dsmil")


def ensure_features(study_config: Path, study_dir: Path, log=print) -> Path:
    """Compose the study's bags and extract their features into ``study_dir`` unless already there."""
    cfg = load_config(study_config)
    bags, feats = study_dir / "bags", study_dir / "features"
    if not (bags / "study.json").is_file():
        log(f"composing the study of {study_config} into {bags}")
        cols = cfg.columns
        table = read_tile_table(cfg.tiles, cols.path, cols.label, cols.patient, cols.split)
        compose_study(table, cfg.study, bags)
    log(f"features in {feats} (bags already extracted are skipped)")
    extract_study(bags, feats, cfg.features, log=log)
    return feats


def table(summary: dict, runs: dict, tests: list[str], n_seeds: int) -> str:
    """Accuracy and AUC per W (rows = models), then mean training seconds and best epoch."""
    witness = [t.rsplit("_", 1)[-1] for t in tests]
    head = "| model | " + " | ".join(f"W={w} acc" for w in witness) + " | " + " | ".join(f"W={w} AUC" for w in witness)
    head += " | train s (mean) | best epoch |"
    sep = "|---|" + "---:|" * (2 * len(tests) + 2)
    rows = []
    for model, cells in summary.items():
        acc = [f"{cells[t]['accuracy']['mean']:.3f} ± {cells[t]['accuracy']['std']:.3f}" for t in tests]
        auc = [f"{cells[t]['roc_auc']['mean']:.3f} ± {cells[t]['roc_auc']['std']:.3f}" for t in tests]
        secs = np.mean([r["train_seconds"] for r in runs[model].values()])
        epochs = ", ".join(str(r["best_epoch"]) for r in runs[model].values())
        rows.append(f"| {model} | " + " | ".join(acc + auc) + f" | {secs:.0f} | {epochs} |")
    note = (
        f"\nMean ± standard deviation over {n_seeds} seeds; accuracy at threshold 0.5 (the EBHI test "
        "sets are balanced, 500 positive and 500 negative bags, so there accuracy = balanced accuracy); "
        "'best epoch' lists the early-stopping epoch of each seed."
    )
    return "\n".join([head, sep, *rows]) + "\n" + note + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where histology_zoo.json/.md go")
    p.add_argument("--study-config", type=Path, default=ROOT / "configs" / "ebhi_original.yaml")
    p.add_argument("--study", type=Path, default=ROOT / "runs" / "ebhi_original", help="bags/ and features/ of the study")
    p.add_argument("--features", type=Path, help="use this study feature folder as it is (skips composing/extracting)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare_ebhi", help="per model/seed training runs")
    p.add_argument("--train-config", type=Path, default=ROOT / "configs" / "compare_train.yaml")
    p.add_argument("--models", nargs="+", default=list(ZOO))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    a = p.parse_args(argv)
    try:
        t0 = time.perf_counter()
        features = a.features or ensure_features(a.study_config, a.study)
        base = validate(TrainConfig, read_mapping(a.train_config), str(a.train_config))
        for seed in a.seeds:  # seed by seed: a stop leaves complete seeds behind
            compare_models(features, a.models, [seed], a.runs, base)
        compare_models(features, a.models, a.seeds, a.runs, base)  # everything cached: aggregates
    except HistomilError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = json.loads((a.runs / "compare.json").read_text())
    tests = list(next(iter(record["summary"].values())))
    result = {
        "protocol": "EBHI witness-rate study (original design), one training per model and seed, "
        "test sets W=20/10/5/1 of 40; accuracy at 0.5 and ROC-AUC, mean ± sd over seeds",
        "features": str(features),
        "train_config": json.loads(base.model_dump_json()),
        "seeds": a.seeds,
        "summary": record["summary"],
        "runs": record["runs"],
        "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "histology_zoo.json", result)
    write_text(a.out / "histology_zoo.md", table(record["summary"], record["runs"], tests, len(a.seeds)))
    print((a.out / "histology_zoo.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

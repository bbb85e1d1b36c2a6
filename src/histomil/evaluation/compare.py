"""Compare several MIL models on the same study, the same splits and the same seeds.

Each (model, seed) pair is trained on the study's ``train`` features with early stopping on ``val``
and evaluated on every ``test*`` feature folder. Runs are kept in ``out/<model>/seed<k>/`` and skipped
when already finished, so an interrupted comparison resumes. The summary table has one row per model
and one column per test set; each cell is accuracy and ROC-AUC as mean ± standard deviation over seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from histomil.errors import HistomilError
from histomil.evaluation.metrics import binary_metrics
from histomil.features.formats import load_feature_dataset
from histomil.files import write_json, write_text
from histomil.training.trainer import TrainConfig, predict, train


def _test_sets(features_dir: Path) -> dict[str, Path]:
    tests = {p.name: p for p in sorted(features_dir.iterdir()) if p.is_dir() and p.name.startswith("test")}
    for need in ("train", "val"):
        if not (features_dir / need).is_dir():
            raise HistomilError(f"{features_dir}: no '{need}' feature folder (expected a study's features)")
    if not tests:
        raise HistomilError(f"{features_dir}: no test* feature folders to evaluate on")
    return dict(sorted(tests.items(), key=lambda kv: _witness_order(kv[0])))


def _witness_order(name: str) -> tuple[int, str]:
    """test_40_20 before test_40_10 before test_40_1: easiest first, like the original tables."""
    tail = name.rsplit("_", 1)[-1]
    return (-int(tail), name) if tail.isdigit() else (0, name)


def compare_models(
    features_dir: str | Path,
    models: list[str],
    seeds: list[int],
    out_dir: str | Path,
    base_config: TrainConfig | None = None,
    threshold: float = 0.5,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Train and evaluate every model with every seed; write compare.json and compare.md."""
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    base = base_config or TrainConfig()
    tests = _test_sets(features_dir)
    train_bags = load_feature_dataset(features_dir / "train", require_labels=True)
    val_bags = load_feature_dataset(features_dir / "val", require_labels=True)
    test_bags = {name: load_feature_dataset(path, require_labels=True) for name, path in tests.items()}
    runs: dict[str, dict[str, dict]] = {}
    total, done = len(models) * len(seeds), 0
    for model in models:
        runs[model] = {}
        for seed in seeds:
            run_dir = out_dir / model / f"seed{seed}"
            result_path = run_dir / "results.json"
            if result_path.is_file():
                runs[model][str(seed)] = json.loads(result_path.read_text())
            else:
                cfg = base.model_copy(update={"model": model, "seed": seed})
                t0 = time.perf_counter()
                fit = train(train_bags, val_bags, cfg, run_dir, resume=True)
                train_s = time.perf_counter() - t0
                from histomil.training.checkpoint import load_checkpoint

                net, _ = load_checkpoint(run_dir / "model.pt")
                results = {}
                for name, bags in test_bags.items():
                    y = np.array([b.label for b in bags])
                    prob = np.array([p[1] for p, _ in predict(net, bags)])
                    results[name] = binary_metrics(y, prob, threshold)
                record = {"best_epoch": fit.best_epoch, "train_seconds": round(train_s, 1), "tests": results}
                write_json(result_path, record)
                runs[model][str(seed)] = record
                log(f"{model} seed {seed}: trained in {train_s:.0f} s (best epoch {fit.best_epoch})")
            done += 1
            if progress:
                progress("comparing models", done, total)
    summary = summarize(runs, list(tests))
    write_json(out_dir / "compare.json", {"features": str(features_dir), "seeds": seeds, "runs": runs, "summary": summary})
    write_text(out_dir / "compare.md", compare_markdown(summary, list(tests), len(seeds)))
    return summary


def summarize(runs: dict[str, dict[str, dict]], test_names: list[str]) -> dict:
    """Mean and standard deviation over seeds of accuracy and ROC-AUC, per model and test set."""
    out: dict[str, dict] = {}
    for model, by_seed in runs.items():
        out[model] = {}
        for name in test_names:
            cell = {}
            for metric in ("accuracy", "roc_auc"):
                values = np.array([r["tests"][name][metric] for r in by_seed.values()], dtype=float)
                values = values[np.isfinite(values)]
                cell[metric] = {
                    "mean": float(values.mean()) if len(values) else float("nan"),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                }
            out[model][name] = cell
    return out


def compare_markdown(summary: dict, test_names: list[str], n_seeds: int) -> str:
    """Rows = models, columns = test sets, cells = 'accuracy ± sd / AUC ± sd'."""
    header = "| model | " + " | ".join(test_names) + " |"
    sep = "|---|" + "---:|" * len(test_names)
    rows = []
    for model, cells in summary.items():
        parts = []
        for name in test_names:
            a, u = cells[name]["accuracy"], cells[name]["roc_auc"]
            parts.append(f"{a['mean']:.3f} ± {a['std']:.3f} / {u['mean']:.3f} ± {u['std']:.3f}")
        rows.append(f"| {model} | " + " | ".join(parts) + " |")
    note = f"\nCells: accuracy / ROC-AUC, mean ± standard deviation over {n_seeds} seed(s)."
    return "\n".join([header, sep, *rows]) + "\n" + note + "\n"

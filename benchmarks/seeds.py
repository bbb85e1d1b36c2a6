"""One run config (``histomil run`` / ``histomil demo``) trained with several seeds: mean ± sd, worst seed.

A single training run is one draw: the same recipe gave 0.82 with one seed and 1.00 with another on
unseen patients. This script runs a config once per training seed (the study and its features are
composed and extracted once, then shared: ``study.seed`` is not the training seed), and summarises each
test set's accuracy and ROC-AUC as mean ± sd over seeds together with the worst seed, plus how late
epochs compare with early ones in time (denormal slowdowns show up there) and the machine.

    python benchmarks/seeds.py --demo --seeds 0 1 2 --out runs/seeds_demo
    python benchmarks/seeds.py --demo --seeds 0 1 2 --set features.precision=bf16 --out runs/seeds_demo_bf16
    python benchmarks/seeds.py --config configs/ebhi_wrange.yaml --seeds 0 1 2 --out runs/seeds_ebhi_wrange

Writes ``OUT/seeds.json`` and ``OUT/seeds.md``; each seed's run folder is ``OUT/seed_<s>`` (resumable:
run again to finish an interrupted seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from histomil.config import parse_overrides
from histomil.pipeline import load_config, run_study
from histomil.resources import demo_config_path


def _share_study(first: Path, run: Path) -> None:
    """Hard-link the first seed's bags and features into ``run`` (identical for every training seed)."""
    for part in ("bags", "features"):
        if (first / part).is_dir() and not (run / part).exists():
            run.mkdir(parents=True, exist_ok=True)
            shutil.copytree(first / part, run / part, copy_function=os.link, symlinks=True)


def _epoch_time_ratio(history_csv: Path) -> float:
    """Mean seconds of the last three epochs over the first three (after the first, which warms up)."""
    with open(history_csv, newline="") as fh:
        secs = [float(r["seconds"]) for r in csv.DictReader(fh)]
    early, late = secs[1:4], secs[-3:]
    return statistics.mean(late) / statistics.mean(early) if len(secs) >= 5 else float("nan")


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarise(out: Path, seeds: list[int]) -> dict:
    per_seed = {}
    for s in seeds:
        run = out / f"seed_{s}"
        metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
        history = run / "model" / "history.csv"
        with open(history, newline="") as fh:
            n_epochs = len(list(csv.DictReader(fh)))
        per_seed[s] = {
            "threshold": metrics["threshold"],
            "results": {k: {m: v[m] for m in ("accuracy", "roc_auc", "recall", "specificity") if m in v}
                        for k, v in metrics["results"].items()},
            "epochs": n_epochs,
            "late_over_early_epoch_time": _epoch_time_ratio(history),
            "timings": json.loads((run / "timings.json").read_text()),
        }
    sets = list(next(iter(per_seed.values()))["results"])
    table = {}
    for name in sets:
        acc = [per_seed[s]["results"][name]["accuracy"] for s in seeds]
        auc = [per_seed[s]["results"][name]["roc_auc"] for s in seeds]
        table[name] = {"accuracy": _mean_sd(acc), "accuracy_worst": min(acc), "roc_auc": _mean_sd(auc),
                       "roc_auc_worst": min(auc)}
    env = json.loads((out / f"seed_{seeds[0]}" / "environment.json").read_text())
    return {"seeds": seeds, "per_seed": per_seed, "table": table, "environment": env,
            "mean_probability_accuracy": {name: _mean_probability_accuracy(out, seeds, name) for name in sets}}


def _mean_probability_accuracy(out: Path, seeds: list[int], name: str) -> float:
    """Accuracy at 0.5 of the seeds' mean positive-class probability (a seed ensemble), bag by bag."""
    probs: dict[str, list[float]] = {}
    truth: dict[str, int] = {}
    for s in seeds:
        with open(out / f"seed_{s}" / "evaluation" / f"predictions_{name}.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                probs.setdefault(r["bag_id"], []).append(float(r["prob_positive"]))
                truth[r["bag_id"]] = int(r["y_true"])
    hits = [(statistics.mean(p) >= 0.5) == (truth[b] == 1) for b, p in probs.items()]
    return sum(hits) / len(hits)


def markdown(summary: dict, command: str) -> str:
    env = summary["environment"]
    lines = [
        f"`{command}`: {len(summary['seeds'])} training seeds ({', '.join(map(str, summary['seeds']))}); "
        f"{env['device_name']} ({env['device_capability']}, bf16 {env['bf16']}), features in {env['precision']}.",
        "",
        "| test set | accuracy (mean ± sd) | worst seed | ROC-AUC (mean ± sd) | worst seed |",
        "|---|---|---:|---|---:|",
    ]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['accuracy']} | {row['accuracy_worst']:.3f} | {row['roc_auc']} | {row['roc_auc_worst']:.3f} |")
    ens = summary["mean_probability_accuracy"]
    lines += ["", "Accuracy of the seeds' mean probability (a seed ensemble): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ens.items()) + "."]
    ratios = [v["late_over_early_epoch_time"] for v in summary["per_seed"].values()]
    epochs = [v["epochs"] for v in summary["per_seed"].values()]
    train_s = [v["timings"].get("train", float("nan")) for v in summary["per_seed"].values()]
    lines += ["", f"Epochs run per seed: {epochs}; training wall time per seed: {[round(t) for t in train_s]} s; "
                  f"last three epochs over epochs 2-4 in time: {[round(r, 2) for r in ratios]}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="a run config (histomil run)")
    src.add_argument("--demo", action="store_true", help="the demo config shipped with histomil")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override a config key, KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--summarise-only", action="store_true", help="rewrite seeds.json / seeds.md from finished runs")
    a = p.parse_args(argv)
    config_path = demo_config_path() if a.demo else a.config
    overrides = parse_overrides(a.overrides)
    a.out.mkdir(parents=True, exist_ok=True)
    first = a.out / f"seed_{a.seeds[0]}"
    for s in [] if a.summarise_only else a.seeds:
        run = a.out / f"seed_{s}"
        if s != a.seeds[0]:
            _share_study(first, run)
        cfg = load_config(config_path, {**overrides, "train.seed": s})
        t0 = time.perf_counter()
        run_study(cfg, run, log=lambda m: print(f"[seed {s}] {m}", flush=True))
        print(f"[seed {s}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    command = "python benchmarks/seeds.py " + " ".join(x for x in (sys.argv[1:] if argv is None else argv) if x != "--summarise-only")
    summary = summarise(a.out, a.seeds)
    summary["command"] = command
    (a.out / "seeds.json").write_text(json.dumps(summary, indent=2))
    (a.out / "seeds.md").write_text(markdown(summary, command))
    print(markdown(summary, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The slide-cohort path end to end on a synthetic cohort with known tumour tiles, through the CLI:

synth-cohort -> tile -> features slides (EfficientNet-Lite0) -> crossval --table (5 folds x 3 seeds) ->
evaluate --table on the held-out patients (each fold model and the ensemble; --slides draws each patient
bag's attention on its slides) -> predict-slides heatmaps of the held-out slides -> localise (both kinds of
heatmap); plus out-of-fold localisation (each fold model's attention on its own test
patients' slides). Every step's wall time is recorded; re-running resumes (finished folds, feature files).

    python benchmarks/synthetic_cohort.py --tiles ../shared/data/ebhi/tiles.csv --out runs/synth_cohort

Writes ``OUT/summary.json`` and ``OUT/summary.md`` (patient-level AUC, balanced accuracy, accuracy as mean
± sd over folds x seeds with the bootstrap interval of the mean; the held-out evaluation; localisation AUC
and top-1 hit rate; the CPU and step times).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_text  # noqa: E402


def cpu_name() -> str:
    """The CPU model as lscpu names it (platform.processor() is often empty on Linux)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def histomil(*args: object) -> float:
    """Run one ``histomil`` command (same interpreter); its wall seconds. A failure stops the benchmark."""
    cmd = [sys.executable, "-m", "histomil", *map(str, args)]
    print("+ histomil", " ".join(map(str, args)), flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, check=False)
    if done.returncode:
        raise SystemExit(f"benchmark stopped: histomil {args[0]} exited with status {done.returncode}")
    return round(time.perf_counter() - t, 1)


def oof_localisation(synth: Path, feats: Path, cv: Path) -> dict:
    """Each fold model's attention on its own test patients' slides, scored against the truth."""
    from histomil.data.cohort import cohort_bags, match_feature_files, read_cohort
    from histomil.evaluation.localisation import attention_by_slide, localise, read_truth, summarise
    from histomil.training.checkpoint import load_checkpoint

    truth = read_truth(synth / "truth.csv")
    cohort = match_feature_files(read_cohort(synth / "cohort.csv", "label"), feats)
    bags = {b.bag_id: b for b in cohort_bags(cohort, "patient")}
    runs, rows = [], []
    for fold_dir in sorted(cv.glob("seed-*/fold-*")):
        rec = json.loads((fold_dir / "metrics.json").read_text())
        model, _ = load_checkpoint(fold_dir / "model.pt")
        fold_rows, summary = localise(attention_by_slide(model, [bags[p] for p in rec["patients"]["test"]]), truth)
        runs.append({"run": str(fold_dir.relative_to(cv)), **summary})
        rows += fold_rows
    aucs = [r["auc_mean"] for r in runs if r["auc_mean"] is not None]
    hits = [r["top1_hit_rate"] for r in runs if r["top1_hit_rate"] is not None]
    return {"per_run": runs, "all_slides": summarise(rows),
            "auc_mean_over_runs": float(np.mean(aucs)), "auc_sd_over_runs": float(np.std(aucs, ddof=1)),
            "top1_mean_over_runs": float(np.mean(hits)), "top1_sd_over_runs": float(np.std(hits, ddof=1))}


def _ci(m: dict) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _point(m: dict, key: str) -> str:
    ci = (m.get("ci") or {}).get(key) or {}
    inner = f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci.get("low") is not None else ""
    return f"{m[key]:.3f}{inner}"


def markdown(s: dict) -> str:
    cv, ext, oof, held = s["crossval"], s["external"], s["localisation_oof"], s["localisation_heldout"]
    folds = ext.get("fold_models_mean", {})
    ens = ext["models"]["ensemble"]
    held_auc = "n/a" if held["auc_mean"] is None else \
        f"{held['auc_mean']:.3f} ± {held['auc_sd'] or 0:.3f} ({held['n_auc_slides']} slides)"
    held_hit = "n/a" if held["top1_hit_rate"] is None else f"{held['top1_hit_rate']:.2f}"
    bags = s["localisation_heldout_patient_bags"]
    bag_auc = "n/a" if bags["auc_mean"] is None else f"{bags['auc_mean']:.3f} ± {bags['auc_sd'] or 0:.3f} ({bags['n_auc_slides']} slides)"
    bag_hit = "n/a" if bags["top1_hit_rate"] is None else f"{bags['top1_hit_rate']:.2f}"
    lines = [
        f"Synthetic cohort: {s['cohort']['n_patients']} patients ({s['cohort']['n_positive_patients']} with tumour), "
        f"{s['cohort']['n_slides']} slides, {s['n_tiles']} tiles; {cv['n_patients'] - cv['n_holdout_patients']} patients "
        f"cross-validated ({cv['folds']} folds x {len(cv['seeds'])} seeds), {cv['n_holdout_patients']} held out. "
        f"CPU: {s['cpu']}.",
        "",
        "| | patient ROC-AUC | balanced accuracy | accuracy | localisation AUC | top-1 tile is tumour |",
        "|---|---|---|---|---|---|",
        f"| cross-validation, mean ± sd over {len(cv['per_fold'])} fold runs [95% CI of the mean] | "
        f"{_ci(cv['mean_over_folds']['roc_auc'])} | {_ci(cv['mean_over_folds']['balanced_accuracy'])} | "
        f"{_ci(cv['mean_over_folds']['accuracy'])} | {oof['auc_mean_over_runs']:.3f} ± {oof['auc_sd_over_runs']:.3f} | "
        f"{oof['top1_mean_over_runs']:.2f} ± {oof['top1_sd_over_runs']:.2f} |",
        f"| held-out patients ({ext['n_patients']}), fold models: mean ± sd | "
        + " | ".join(f"{folds[k]['mean']:.3f} ± {folds[k]['std']:.3f}" for k in ("roc_auc", "balanced_accuracy", "accuracy"))
        + " | | |",
        f"| held-out patients ({ext['n_patients']}), ensemble [95% CI] | {_point(ens, 'roc_auc')} | "
        f"{_point(ens, 'balanced_accuracy')} | {_point(ens, 'accuracy')} | {held_auc} | {held_hit} |",
        f"| held-out patients, ensemble, attention of the patient bags (evaluate --slides) | | | | {bag_auc} | {bag_hit} |",
        "",
        "Localisation AUC: per slide with tumour, the ROC-AUC of the model's attention against the known tumour "
        "tiles; cross-validation: each fold model on its own test patients' slides (mean ± sd over fold runs), "
        "held out: the ensemble's heatmaps (predict-slides) of the held-out slides (mean ± sd over slides).",
        "",
        "Step wall times (s): " + ", ".join(f"{k} {v}" for k, v in s["timings"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiles", type=Path, default=None, help="tile table (default: the example tiles shipped with histomil)")
    ap.add_argument("--patients", type=int, default=32)
    ap.add_argument("--cohort-seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--grid-min", type=int, default=4)
    ap.add_argument("--grid-max", type=int, default=6)
    args = ap.parse_args(argv)
    out: Path = args.out
    synth, tiles, feats, cv = out / "synth", out / "tiles", out / "feats", out / "cv"
    timings: dict[str, float] = {}
    if not (synth / "cohort.json").is_file():
        timings["synth-cohort"] = histomil(
            "synth-cohort", "--out", synth, "--patients", args.patients, "--seed", args.cohort_seed,
            "--grid-min", args.grid_min, "--grid-max", args.grid_max, *(["--tiles", args.tiles] if args.tiles else []))
    if not any(tiles.glob("*.h5")):
        timings["tile"] = histomil("tile", synth / "slides", "--out", tiles, "--slide-mpp", 0.5)
    timings["features slides"] = histomil("features", "slides", synth / "slides", "--coords", tiles, "--out", feats,
                                          "--slide-mpp", 0.5)
    timings["crossval"] = histomil("crossval", "--table", synth / "cohort.csv", "--features", feats, "--target", "label",
                                   "--folds", args.folds, "--seeds", args.seeds, "--epochs", args.epochs, "--out", cv)
    timings["evaluate"] = histomil("evaluate", cv, "--table", synth / "cohort.csv", "--features", feats, "--target",
                                   "label", "--slides", synth / "slides", "--slide-mpp", 0.5, "--out", out / "external")
    with open(synth / "cohort.csv", newline="") as fh:
        test_slides = [synth / "slides" / f"{r['slide']}.tif" for r in csv.DictReader(fh) if r["split"] == "test"]
    timings["predict-slides"] = histomil("predict-slides", cv / "ensemble.pt", *test_slides, "--features", feats,
                                         "--slide-mpp", 0.5, "--out", out / "deploy")
    timings["localise"] = histomil("localise", synth / "truth.csv", out / "deploy" / "heatmaps",
                                   "--out", out / "localisation_heldout.json")
    histomil("localise", synth / "truth.csv", out / "external" / "heatmaps", "--out", out / "localisation_patient_bags.json")
    t = time.perf_counter()
    oof = oof_localisation(synth, feats, cv)
    timings["out-of-fold localisation"] = round(time.perf_counter() - t, 1)
    import h5py

    n_tiles = sum(h5py.File(p, "r")["coords"].shape[0] for p in tiles.glob("*.h5"))
    summary = {
        "cpu": cpu_name(), "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
        "cohort": json.loads((synth / "cohort.json").read_text())["summary"], "n_tiles": n_tiles,
        "crossval": json.loads((cv / "metrics.json").read_text()),
        "external": json.loads((out / "external" / "metrics.json").read_text()),
        "localisation_heldout": json.loads((out / "localisation_heldout.json").read_text())["summary"],
        "localisation_heldout_patient_bags": json.loads((out / "localisation_patient_bags.json").read_text())["summary"],
        "localisation_oof": oof, "timings": timings,
    }
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

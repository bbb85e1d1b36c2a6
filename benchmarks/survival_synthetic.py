"""Survival MIL on a synthetic cohort of real EBHI tiles whose hazard grows with the tumour content.

Composes bags of 40 EBHI tiles (W tumour tiles; patients split 60/20/20 into train / val / test),
encodes them with EfficientNet-Lite0, and for each seed draws event times with hazard
0.1 * exp(3 * W / 40) and ~30% independent exponential censoring
(:mod:`histomil.data.synthetic_survival`), trains gated-attention MIL with the Cox loss (and the
discrete-time loss) on the training bags, early-stops on the validation c-index, and reports the test
c-index (Harrell, Uno), time-dependent AUC, integrated Brier score and the log-rank p of the risk
groups split at the training median, next to the ORACLE: the same metrics of the true log hazard.

    nice python benchmarks/survival_synthetic.py --out runs/survival_synthetic --seeds 0 1 2

Writes ``results.json``, ``results.md`` and ``km_<loss>_seed<S>.png`` into ``--out``; the composed bags
and features (``--out/cohort``) are reused by a second run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_text  # noqa: E402

from histomil.data.synthetic_survival import (  # noqa: E402
    SurvivalCohortSpec,
    cohort_summary,
    draw_times,
    make_survival_cohort,
    read_survival_cohort,
    with_targets,
)
from histomil.evaluation.survival import survival_metrics, survival_targets  # noqa: E402
from histomil.evaluation.survival_report import evaluate_survival, held_out_times  # noqa: E402
from histomil.features.formats import load_feature_dataset  # noqa: E402
from histomil.pipeline import FeatureConfig  # noqa: E402
from histomil.training.checkpoint import load_checkpoint  # noqa: E402
from histomil.training.tasks import task_from_checkpoint  # noqa: E402
from histomil.training.trainer import TrainConfig, predict, train  # noqa: E402

EBHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ebhi" / "tiles.csv"
METRICS = ("cindex_harrell", "cindex_uno", "td_auc", "ibs")


def train_config(loss: str, seed: int, epochs: int) -> TrainConfig:
    options = {"n_bins": 4} if loss == "discrete" else {}
    return TrainConfig(task="survival", loss=loss, task_options=options, model="gated_abmil", epochs=epochs,
                       min_epochs=10, patience=10, lr=5e-4, batch_size=32, seed=seed, monitor="val_cindex")


def run_seed(bags: dict[str, Any], rows: list[dict[str, Any]], spec: SurvivalCohortSpec, seed: int, loss: str,
             out: Path, epochs: int, resamples: int) -> dict[str, Any]:
    """Draw the times of ``seed``, train one model, evaluate it and the oracle on the test bags."""
    draws = draw_times(np.array([r["witnesses"] for r in rows]), spec, seed)
    split_of = {r["slide"]: r["role"] for r in rows}
    sets: dict[str, list] = {"train": [], "val": [], "test": []}
    oracle: dict[str, list[float]] = {"train": [], "val": [], "test": []}
    for r, t, e, lh in zip(rows, draws["time"], draws["event"], draws["log_hazard"]):
        sets[split_of[r["slide"]]].append(with_targets(bags[r["slide"]], t, e, r["slide"]))
        oracle[split_of[r["slide"]]].append(float(lh))
    targets = {k: survival_targets([b.target[0] for b in v], [b.target[1] for b in v], k) for k, v in sets.items()}
    t0 = time.perf_counter()
    result = train(sets["train"], sets["val"], train_config(loss, seed, epochs), out / f"model_{loss}_seed{seed}")
    seconds = time.perf_counter() - t0
    model, meta = load_checkpoint(result.model_path)
    task = task_from_checkpoint(meta)
    pred = {k: np.array([p for p, _ in predict(model, sets[k], task=task)]) for k in ("train", "test")}
    times = held_out_times(targets["train"], targets["test"])
    surv = task.survival_at(pred["test"], times) if loss == "discrete" else None
    model_eval = evaluate_survival(targets["train"], pred["train"][:, 0], targets["test"], pred["test"][:, 0],
                                   survival=surv, times=times, km_png=out / f"km_{loss}_seed{seed}.png",
                                   title=f"{loss} model, seed {seed}", n_resamples=resamples, seed=seed)
    true_test = np.array(oracle["test"])
    true_surv = np.exp(-np.exp(true_test)[:, None] * times[None, :])  # S(t) = exp(-hazard t)
    oracle_point = survival_metrics(targets["test"], true_test, targets["train"], times, true_surv)
    oracle_km = evaluate_survival(targets["train"], np.array(oracle["train"]), targets["test"], true_test,
                                  survival=true_surv, times=times, n_resamples=1, seed=seed)["risk_groups"]
    return {"seed": seed, "loss": loss, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "train_seconds": round(seconds, 1), "censored": {k: float(1 - v.event.mean()) for k, v in targets.items()},
            "model": model_eval, "oracle": {"metrics": oracle_point, "risk_groups": oracle_km}}


def markdown(results: list[dict[str, Any]]) -> str:
    head = ("| loss | seed | Harrell c: model (95% CI) | oracle | Uno c: model | oracle | td-AUC: model | oracle "
            "| IBS: model | oracle | log-rank p: model | oracle | best epoch |")
    lines = [head, "|" + "---|" * 13]
    for r in results:
        m, o = r["model"]["metrics"], r["oracle"]["metrics"]
        c = m["cindex_harrell"]
        lines.append(
            f"| {r['loss']} | {r['seed']} | {c['value']:.3f} ({c['low']:.3f}-{c['high']:.3f}) | {o['cindex_harrell']:.3f} "
            f"| {m['cindex_uno']['value']:.3f} | {o['cindex_uno']:.3f} | {m['td_auc']['value']:.3f} | {o['td_auc']:.3f} "
            f"| {m['ibs']['value']:.3f} | {o['ibs']:.3f} | {r['model']['risk_groups']['logrank_p']:.2g} "
            f"| {r['oracle']['risk_groups']['logrank_p']:.2g} | {r['best_epoch']} |")
    for loss in sorted({r["loss"] for r in results}):
        sub = [r for r in results if r["loss"] == loss]
        gap = [r["model"]["metrics"]["cindex_harrell"]["value"] - r["oracle"]["metrics"]["cindex_harrell"] for r in sub]
        mc = [r["model"]["metrics"]["cindex_harrell"]["value"] for r in sub]
        oc = [r["oracle"]["metrics"]["cindex_harrell"] for r in sub]
        lines.append(f"\n{loss}: Harrell c-index model {np.mean(mc):.3f} ± {np.std(mc, ddof=1) if len(mc) > 1 else float('nan'):.3f}, "
                     f"oracle {np.mean(oc):.3f} ± {np.std(oc, ddof=1) if len(oc) > 1 else float('nan'):.3f}, "
                     f"model - oracle {np.mean(gap):+.3f} (over {len(sub)} seeds)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiles", type=Path, default=EBHI, help="tile table (path, tumor, case_id columns)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=["cox", "discrete"], choices=["cox", "discrete"])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the test bags")
    p.add_argument("--train-bags", type=int, default=300)
    p.add_argument("--val-bags", type=int, default=100)
    p.add_argument("--test-bags-per-w", type=int, default=8, help="test bags of each W = 1..bag size")
    p.add_argument("--bag-size", type=int, default=40)
    p.add_argument("--encoder", default="efficientnet_lite0")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    spec = SurvivalCohortSpec(train_bags=a.train_bags, val_bags=a.val_bags, test_bags_per_w=a.test_bags_per_w,
                              bag_size=a.bag_size)
    t0 = time.perf_counter()
    table = make_survival_cohort(a.tiles, a.out / "cohort", spec, FeatureConfig(encoder=a.encoder),
                                 log=lambda m: print(m, flush=True))
    prep = time.perf_counter() - t0
    rows = read_survival_cohort(table)
    print(f"cohort ready in {prep:.0f} s: {cohort_summary(rows)}", flush=True)
    bags = {Path(b.attrs["source_file"]).stem: b for b in load_feature_dataset(a.out / "cohort" / "slides")}
    results = []
    for loss in a.losses:
        for seed in a.seeds:
            r = run_seed(bags, rows, spec, seed, loss, a.out, a.epochs, a.resamples)
            print(f"{loss} seed {seed}: model c {r['model']['metrics']['cindex_harrell']['value']:.3f} "
                  f"oracle c {r['oracle']['metrics']['cindex_harrell']:.3f} ({r['train_seconds']} s)", flush=True)
            results.append(r)
            write_json(a.out / "results.json", {"spec": spec.model_dump(mode="json"), "cohort_seconds": round(prep, 1),
                                                 "machine": machine(), "results": results})
    text = markdown(results)
    write_text(a.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

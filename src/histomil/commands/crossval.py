"""``histomil crossval``: patient-grouped cross-validation repeated over seeds, with bootstrap intervals.

Two inputs: a slide cohort (``--table cohort.csv --features slide_features/ --target label``: per-slide
feature files of any layout histomil reads, :mod:`histomil.evaluation.cohort_cv`) or a composed tile
study (a CONFIG YAML, :mod:`histomil.evaluation.protocol`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from histomil.config import parse_overrides
from histomil.devices import resolve_device
from histomil.errors import HistomilError
from histomil.ui import log, progress_bars, show_result, user_errors


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise HistomilError(f"--seeds {text}: give whole numbers separated by commas, e.g. 0,1,2") from None


@user_errors
def crossval_cmd(
    config: Path | None = typer.Argument(
        None, help="Tile-study cross-validation config (YAML). Not with --table: a slide cohort needs no config."),
    out: Path = typer.Option(..., "--out", help="Output folder (running again resumes: finished folds are skipped)."),
    table: Path | None = typer.Option(None, "--table", help="Cohort table: one row per slide (slide, patient, target[, split, fold, group])."),
    features: Path | None = typer.Option(None, "--features", help="Folder of per-slide feature files <slide>.h5/.pt (histomil, CLAM, TRIDENT, STAMP)."),
    target: str | None = typer.Option(None, "--target", help="The table column to predict."),
    task: str | None = typer.Option(None, "--task", help="classification (default), regression (--target: a numeric column; folds stratified on its quantiles) or survival (with --time and --event)."),
    loss: str | None = typer.Option(None, "--loss", help="The task's loss: regression mse (default) or huber; survival cox (default) or discrete."),
    time_column: str | None = typer.Option(None, "--time", help="Survival: the follow-up time column (> 0)."),
    event_column: str | None = typer.Option(None, "--event", help="Survival: the event column (1 = event, 0 = censored); folds are stratified on it."),
    clinical_table: Path | None = typer.Option(None, "--clinical-table", help="Per-patient table (patient, target...); --table then maps slide -> patient."),
    folds: int | None = typer.Option(None, "--folds", help="Patient-grouped folds (cohort default 5)."),
    seeds: str | None = typer.Option(None, "--seeds", help="Seeds, e.g. 0,1,2: each repeats the folds and training (default 0)."),
    bag_level: str | None = typer.Option(None, "--bag-level", help="patient (default: all of a patient's slides in one bag) or slide (predictions averaged per patient)."),
    classes: str | None = typer.Option(None, "--classes", help="Class order, e.g. normal,tumor (index 0, 1...; the second of two is positive). Default: sorted labels."),
    on_missing: str | None = typer.Option(None, "--on-missing", help="error (default) or skip: drop slides without feature files, files without rows and rows without a target, with a warning."),
    slide_column: str | None = typer.Option(None, "--slide-column", help="Slide column of the table (default slide)."),
    patient_column: str | None = typer.Option(None, "--patient-column", help="Patient column of the table(s) (default patient)."),
    model: str | None = typer.Option(None, "--model", help="MIL model (default gated_abmil)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum training epochs per fold."),
    train_config: Path | None = typer.Option(None, "--config", help="YAML of training keys (lr, epochs, model_kwargs...), or of cohort settings with a train: section."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.lr=1e-3 --set val_fraction=0.25."),
    stream: str | None = typer.Option(None, "--stream", help="off (default): every slide's features in memory; on: read from the files when used (cohorts larger than memory); auto: on when they would take over a quarter of the memory."),
) -> None:
    """Patient-grouped k-fold cross-validation over several seeds: mean, std and bootstrap 95% CIs."""
    overrides = parse_overrides(set_)
    cohort_options = {"--table": table, "--features": features, "--target": target, "--clinical-table": clinical_table,
                      "--folds": folds, "--seeds": seeds, "--bag-level": bag_level, "--classes": classes,
                      "--on-missing": on_missing, "--slide-column": slide_column, "--patient-column": patient_column,
                      "--model": model, "--epochs": epochs, "--config": train_config, "--task": task,
                      "--time": time_column, "--event": event_column, "--stream": stream, "--loss": loss}
    if config is not None:
        given = [k for k, v in cohort_options.items() if v is not None]
        if given:
            raise HistomilError(f"{config}: a tile-study config takes no {given[0]} (give --table ... without CONFIG for a slide cohort)")
        _tile_study(config, out, overrides)
        return
    if task == "regression":
        given = [k for k in ("--classes", "--time", "--event") if cohort_options[k] is not None]
        if given:
            raise HistomilError(f"crossval: {given[0]} does not apply to --task regression (its --target is a numeric column)")
    if event_column is not None:
        if target is not None and target != event_column:
            raise HistomilError("crossval: --event is the target of a survival cross-validation; give --event or --target, not both")
        target = cohort_options["--target"] = event_column
    missing = [k for k in ("--table", "--features", "--target") if cohort_options[k] is None]
    if missing:
        raise HistomilError(f"crossval: give a tile-study CONFIG, or a slide cohort with --table, --features and --target "
                            f"({', '.join(missing)} missing)")
    from histomil.evaluation.cohort_cv import cohort_config, run_cohort_crossval

    train: dict[str, Any] = {k: v for k, v in {"model": model, "epochs": epochs, "loss": loss}.items() if v is not None}
    columns = {k: v for k, v in {"slide": slide_column, "patient": patient_column}.items() if v is not None}
    options: dict[str, Any] = {
        "table": table, "features": features, "target": target, "clinical_table": clinical_table, "folds": folds,
        "seeds": _seeds(seeds), "bag_level": bag_level, "on_missing": on_missing, "task": task, "time": time_column,
        "stream": stream,
        "classes": classes.split(",") if classes is not None else None,
        **({"columns": columns} if columns else {}), **({"train": train} if train else {}),
    }
    cfg = cohort_config(options, train_config, overrides)
    from histomil.training.distributed import FOLD_TIMEOUT, distributed_session

    # under torchrun the folds are spread over the ranks; rank 0 writes and shows the results
    with distributed_session(resolve_device(cfg.train.device), timeout=FOLD_TIMEOUT) as world, progress_bars() as progress:
        summary = run_cohort_crossval(cfg, out, log=log if world.is_main else (lambda _m: None), progress=progress)
    if not world.is_main:
        return
    show_result(_cohort_table(summary))
    # classifiers and regression models are combined into ensemble.pt; survival risks share no scale
    ensemble = " and ensemble.pt" if summary.get("task", "classification") != "survival" else ""
    show_result(f"wall time {summary['wall_seconds']:.0f} s; out-of-fold predictions, metrics, fold models{ensemble} in {out}")


def _tile_study(config: Path, out: Path, overrides: dict[str, Any]) -> None:
    from histomil.evaluation.protocol import crossval_report, load_crossval_config, run_crossval
    from histomil.training.distributed import world

    if world().distributed:
        raise HistomilError(f"{config}: a tile-study cross-validation runs as one process; start it without torchrun "
                            "(slide cohorts, --table ..., spread their folds over torchrun's processes)")

    cfg = load_crossval_config(config, overrides)
    with progress_bars() as progress:
        summary = run_crossval(cfg, out, log=log, progress=progress)
    show_result(crossval_report(summary))
    show_result(f"wall time {summary['wall_seconds']:.0f} s; reports, plots and per-fold results in {out}")


def _cohort_table(summary: dict[str, Any]) -> str:
    """Patient-level metrics: mean ± sd over folds [95% CI of the mean], and pooled per seed [95% CI]."""
    def num(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{float(v):.3f}"

    mean = summary["mean_over_folds"]
    names = [m for m in mean if isinstance(mean[m], dict) and "mean" in mean[m] and all(m in p for p in summary["pooled"].values())]
    pos = f", positive class {summary['positive_class']!r}" if summary.get("positive_class") is not None else ""
    what = (f"target {summary['target']!r} (regression)" if summary.get("task") == "regression"
            else f"classes {summary['classes']}{pos}")
    lines = [f"{summary['n_patients']} patients ({summary['n_slides']} slides), {summary['folds']} folds x "
             f"{len(summary['seeds'])} seed(s), bags per {summary['bag_level']}; {what}",
             "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    cells = []
    for m in names:
        s = mean[m]
        cells.append(f"{num(s.get('mean'))} ± {num(s.get('std'))}" + (f" [{num(s['low'])}, {num(s['high'])}]" if "low" in s else ""))
    lines.append("| mean ± sd over folds | " + " | ".join(cells) + " |")
    for seed, pooled in summary["pooled"].items():
        row = [num(pooled[m]["value"]) + (f" [{num(pooled[m]['low'])}, {num(pooled[m]['high'])}]" if "low" in pooled[m] else "")
               for m in names]
        lines.append(f"| pooled, {seed} | " + " | ".join(row) + " |")
    across = summary.get("mean_over_seeds")
    if across and len(summary["seeds"]) > 1:
        lines.append("| pooled, mean ± sd over seeds | " + " | ".join(
            f"{num(across[m].get('mean'))} ± {num(across[m].get('std'))}" if m in across else "n/a" for m in names) + " |")
    if "holdout" in summary:
        h = summary["holdout"]
        lines.append(f"| held out ({h['n_patients']}), ensemble | " + " | ".join(num(h.get(m)) for m in names) + " |")
    return "\n".join(lines)

"""``histomil run`` and ``histomil demo``: every step from one config file, timed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from histomil.config import parse_overrides
from histomil.ui import log, progress_bars, show_result, user_errors

if TYPE_CHECKING:
    from histomil.pipeline import StudyRunConfig


@user_errors
def run_cmd(
    config: Path = typer.Argument(..., help="Study run config (YAML): tile table, study, features, train."),
    out: Path = typer.Option(..., "--out", help="Run folder (re-running resumes finished steps)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set study.train_bags=500."),
) -> None:
    """Compose bags, extract features, train and evaluate, timing each step."""
    from histomil.pipeline import load_config

    cfg = load_config(config, parse_overrides(set_))
    run_and_print(cfg, out)


def run_and_print(cfg: "StudyRunConfig", out: Path) -> None:
    """Run a study config into ``out`` and print its metrics table and step timings."""
    from histomil.pipeline import run_study
    from histomil.reports.tables import metrics_markdown

    with progress_bars() as progress:
        results = run_study(cfg, out, log=log, progress=progress)
    if cfg.train.task == "classification":
        show_result(metrics_markdown(results))
    else:  # a regression's table (MAE, RMSE, R², Pearson, Spearman), as written beside its metrics.json
        show_result((out / "evaluation" / "metrics.md").read_text())
    timings = json.loads((out / "timings.json").read_text())
    show_result("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    show_result(f"results in {out / 'evaluation'}")


@user_errors
def demo_cmd(
    out: Path = typer.Option(Path("demo_run"), "--out", help="Run folder for the demo."),
    set_: list[str] = typer.Option([], "--set", help="Override a demo config key, e.g. --set train.epochs=5."),
) -> None:
    """Build a small study from the shipped example tiles, train gated attention MIL, print the table."""
    from histomil.pipeline import load_config
    from histomil.resources import demo_config_path

    log("histomil demo: example H&E tiles from EBHI-Seg (CC BY 4.0, Shi et al. 2023), bags of 40, "
         "test sets with W = 20, 10, 5, 1 tumour tiles")
    cfg = load_config(demo_config_path(), parse_overrides(set_))
    run_and_print(cfg, out)

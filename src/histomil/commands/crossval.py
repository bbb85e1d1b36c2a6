"""``histomil crossval``: patient-grouped cross-validation repeated over seeds, with bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

import typer

from histomil.config import parse_overrides
from histomil.ui import log, progress_bars, show_result, user_errors


@user_errors
def crossval_cmd(
    config: Path = typer.Argument(..., help="Cross-validation config (YAML): tile table, folds, seeds, study sizes, training."),
    out: Path = typer.Option(..., "--out", help="Output folder (running again resumes: finished folds are skipped)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set folds=3 --set seeds=[0,1]."),
) -> None:
    """Patient-grouped k-fold cross-validation over several seeds: mean, std and bootstrap 95% CIs."""
    from histomil.evaluation.protocol import (
        crossval_markdown,
        load_crossval_config,
        run_crossval,
    )

    cfg = load_crossval_config(config, parse_overrides(set_))
    with progress_bars() as progress:
        summary = run_crossval(cfg, out, log=log, progress=progress)
    show_result(crossval_markdown(summary))
    show_result(f"wall time {summary['wall_seconds']:.0f} s; reports, plots and per-fold results in {out}")

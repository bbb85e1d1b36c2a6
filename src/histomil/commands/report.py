"""``histomil report``: one self-contained HTML report of a study run or a cross-validation."""

from __future__ import annotations

from pathlib import Path

import typer

from histomil.ui import log, show_result, user_errors


@user_errors
def report_cmd(
    run_dir: Path = typer.Argument(..., help="Output folder of 'histomil run', 'demo' or 'crossval'."),
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default RUN_DIR/report.html); PNGs go to <name>_figures/ beside it."),
    bag: list[str] = typer.Option([], "--bag", help="Also show this bag's tiles: SET/BAG (e.g. test_40_5/3), or seed_S/fold_F/SET/BAG in a cross-validation. Repeatable."),
    max_bags: int = typer.Option(6, "--max-bags", help="Bags chosen automatically for tile galleries: half most confident, half most wrong."),
    max_tiles: int = typer.Option(40, "--max-tiles", help="Tiles shown per bag, highest attention first."),
    task: str | None = typer.Option(None, "--task", help="classification, regression or survival: refuse a run of another task. An 'evaluate' folder of a multi-class, regression or survival model gets its own report."),
) -> None:
    """Write an HTML report: metrics with 95% CIs, training / ROC / PR / calibration plots, tile galleries by attention."""
    from histomil.reports.html import build_report

    path = build_report(run_dir, out, bags=bag, max_bags=max_bags, max_tiles=max_tiles, log=log, task=task)
    show_result(f"open {path} in a browser (no network needed)")

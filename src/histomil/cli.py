"""The ``histomil`` command line: one command with a sub-command per pipeline step.

bags make / bags check -> features extract -> train -> evaluate -> predict, plus ``run`` (all steps
from one config file) and ``demo`` (``run`` on the example tiles shipped with histomil).
Every user error is printed as one ``error:`` line and exits with status 2.

This module only assembles the typer app: each command lives in a module of ``histomil.commands``.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multiple instance learning for histology.")
bags_app = typer.Typer(no_args_is_help=True, help="Compose and check bag datasets.")
features_app = typer.Typer(no_args_is_help=True, help="Extract tile features into per-bag HDF5 files.")
app.add_typer(bags_app, name="bags")
app.add_typer(features_app, name="features")


def _print_version(value: bool) -> None:
    if value:
        from histomil import __version__

        typer.echo(f"histomil {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Multiple instance learning for histology."""


def _register_commands() -> None:
    """Every sub-command, in the order ``histomil --help`` lists them."""
    from histomil.commands import bags, crossval, encoders, evaluation, features, pixels, report, run, slides, training
    from histomil.commands import synthetic

    bags_app.command("make")(bags.bags_make)
    bags_app.command("check")(bags.bags_check)
    features_app.command("extract")(features.features_extract)
    app.command("train")(training.train_cmd)
    app.command("evaluate")(evaluation.evaluate_cmd)
    app.command("predict")(evaluation.predict_cmd)
    app.command("ensemble")(training.ensemble_cmd)
    app.command("compare")(training.compare_cmd)
    app.command("run")(run.run_cmd)
    app.command("demo")(run.demo_cmd)
    app.command("tile")(slides.tile_cmd)
    features_app.command("slides")(slides.slide_features_cmd)
    features_app.command("export")(slides.export_features_cmd)
    app.command("heatmap")(slides.heatmap_cmd)
    app.command("predict-slides")(slides.predict_slides_cmd)
    app.command("train-pixels")(pixels.train_pixels_cmd)
    app.command("crossval")(crossval.crossval_cmd)
    app.command("report")(report.report_cmd)
    app.command("encoders")(encoders.encoders_cmd)
    app.command("synth-cohort")(synthetic.synth_cohort_cmd)
    app.command("localise")(synthetic.localise_cmd)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    app()

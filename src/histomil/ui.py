"""Console output: rich progress bars driven by plain ``(stage, done, total)`` callbacks.

Library code never imports rich; it accepts a ``progress`` callback. The CLI passes the one made
here, which opens one bar per stage name the first time that stage reports.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from histomil.errors import HistomilError

console = Console(stderr=False)
err_console = Console(stderr=True)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``progress(stage, done, total)`` callback backed by rich bars (silent when disabled)."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    bars = Progress(
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Show a warning as one ``warning:`` line on stderr (no file name, no source line)."""
    err_console.print(Text.assemble(("warning: ", "yellow"), str(message)), highlight=False, soft_wrap=True)


def user_errors(fn: Callable) -> Callable:
    """Turn HistomilError into a one-line message and exit status 2; warnings become one line each."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return fn(*args, **kwargs)
        except HistomilError as exc:
            err_console.print(Text.assemble(("error: ", "red"), str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished outputs are kept; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


def log(message: str) -> None:
    """Print one plain line (no markup, no highlighting)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)

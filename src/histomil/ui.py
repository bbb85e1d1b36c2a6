"""Console output: rich progress bars driven by plain ``(stage, done, total)`` callbacks.

Library code never imports rich; it accepts a ``progress`` callback. The CLI passes the one made
here, which opens one bar per stage name the first time that stage reports.

stdout carries results only (tables, summaries: :func:`show_result`), so ``histomil ... > file`` and pipes
get just those; progress bars, log lines (:func:`log`), warnings and errors go to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
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

from histomil.errors import HistomilError, os_error_line

console = Console(stderr=False)  # results only
err_console = Console(stderr=True)  # progress, log lines, warnings, errors


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
        console=err_console,
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


def _error(message: str) -> None:
    """One red ``error:`` line on stderr."""
    err_console.print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)


def user_errors(fn: Callable) -> Callable:
    """Turn HistomilError and OSError (full disk, read-only folder, no permission) into one ``error:``
    line and exit status 2; warnings become one line each.

    An OSError that names no file (Python's write errors do not) is reported against the command's
    ``out`` argument, the only place a command writes to.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return fn(*args, **kwargs)
        except HistomilError as exc:
            _error(str(exc))
            raise typer.Exit(2) from None
        except BrokenPipeError:  # stdout's reader went away (``histomil ... | head``): nothing to say
            with contextlib.suppress(OSError, ValueError):  # no more writes to the closed pipe at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except OSError as exc:
            out = signature.bind_partial(*args, **kwargs).arguments.get("out")
            _error(os_error_line(exc, fallback=out))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished outputs are kept; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


def log(message: str) -> None:
    """Print one plain progress or log line to stderr (no markup, no highlighting)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def show_result(message: str) -> None:
    """Print a result (a table, a summary, where the outputs went) to stdout, as plain text."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)

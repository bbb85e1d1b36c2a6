"""The callbacks long jobs report through: ``Log`` takes one line of text, ``Progress`` a stage name with
the items done and the total (the CLI draws both with rich; the Python API may pass any function)."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]  # (stage, done, total)

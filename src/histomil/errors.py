"""User-facing errors.

Every problem a user can fix (bad file, bad option, impossible request) is raised as a
:class:`HistomilError` whose message is one line that names the file and the problem. The CLI
prints it as ``error: <message>`` and exits with status 2, never with a traceback.
"""

from __future__ import annotations

from pathlib import Path


class HistomilError(Exception):
    """A problem with the user's input, explained in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BadTileError(HistomilError):
    """A tile image that cannot be used (unreadable, undecodable, unsupported pixel format)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

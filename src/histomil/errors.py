"""User-facing errors.

Every problem a user can fix (bad file, bad option, impossible request) is raised as a
:class:`HistomilError` whose message is one line that names the file and the problem. The CLI
prints it as ``error: <message>`` and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import errno
import os
import re
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


# errno values that mean "this output cannot be written here" (disk full, quota, read-only, no permission)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})
# h5py puts the system's errno and the file name into its message text, not into the OSError's fields
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")
_NAME_IN_TEXT = re.compile(r"\bname = '([^']+)'")


def _errno_of(exc: BaseException) -> int | None:
    """The system errno of an OSError, or the one h5py wrote into its message."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        match = _ERRNO_IN_TEXT.search(str(exc))
        code = int(match[1]) if match else None
    return code


def _full_or_read_only(folder: Path) -> int | None:
    """ENOSPC or EROFS when ``folder``'s file system is full or mounted read-only (else None)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail == 0:
        return errno.ENOSPC
    return None


def write_failure(exc: BaseException, final: Path, tmp: Path | None = None) -> OSError | None:
    """The OSError naming ``final`` that ``exc``, raised while writing ``final`` (via ``tmp``), amounts to.

    Writers report a full or read-only disk in different ways: Python's OSError without a file name,
    h5py's OSError/RuntimeError with the errno in its text, torch's RuntimeError ('unexpected pos ...')
    with none at all (then the disk's state decides). None when ``exc`` is not a failed write of this
    file, e.g. an error reading an input file while the output was open.
    """
    if not isinstance(exc, (OSError, RuntimeError)) or isinstance(exc, HistomilError):
        return None
    filename = getattr(exc, "filename", None)
    if filename is not None and tmp is not None and Path(filename) != tmp:
        return None  # another file's problem (it names that file itself)
    named = _NAME_IN_TEXT.search(str(exc))
    if named and tmp is not None and Path(named[1]).name != tmp.name:
        return None
    code = _errno_of(exc)
    if code is None:
        code = _full_or_read_only(final.parent)
    if code not in WRITE_ERRNOS:
        return None
    return OSError(code, os.strerror(code), str(final))


def os_error_line(exc: OSError, fallback: str | Path | None = None) -> str:
    """One line for an OSError: '<path>: <problem>', the path from the error, h5py's text or ``fallback``."""
    code = _errno_of(exc)
    problem = os.strerror(code).lower() if code is not None else (str(exc).splitlines() or [type(exc).__name__])[0]
    name = exc.filename
    if name is None:
        match = _NAME_IN_TEXT.search(str(exc))
        name = match[1] if match else fallback
    if exc.filename2 is not None:
        name = f"{name} -> {exc.filename2}"
    return f"{name}: {problem}" if name is not None else problem

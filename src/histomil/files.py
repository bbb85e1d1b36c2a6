"""Output files, written so that nothing a user made is lost or half-written.

* :func:`atomic_write` / :func:`atomic_path`: write-then-rename beside the final file; a failure for
  want of space or permission names the file; :func:`remove_temp_leftovers` clears what a killed
  process left.
* :func:`exclusive_output`: one writing process per output folder (a file lock the OS releases even
  on kill -9).
* :func:`write_bytes`, :func:`write_text`, :func:`write_json` (through :func:`sanitize`: NaN becomes
  ``null``, numpy becomes Python): the report and table writers every step uses.
* :func:`natural_key`: the order of file names a person expects ('slide2' before 'slide10').
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import tempfile
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import filelock
import numpy as np

from histomil.errors import WRITE_ERRNOS, HistomilError, write_failure


def atomic_path(final: Path) -> Path:
    """A temporary path in the same folder as ``final``, for write-then-rename.

    A folder that cannot take it (read-only, full, not ours) raises an OSError naming ``final``."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(final)) from None
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should read like any other file
    return Path(tmp)


@contextmanager
def atomic_write(final: Path) -> Iterator[Path]:
    """Write-then-rename: yields a temporary path beside ``final``, renamed over ``final`` when the
    block succeeds and removed when it raises (interrupts included), so readers never see half a file.

    A write that fails for want of space or permission, however the writer (Python, h5py, torch) says
    so, is raised as an OSError naming ``final`` and the problem (:func:`histomil.errors.write_failure`)."""
    tmp = atomic_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        failure = write_failure(exc, final, tmp)  # before the unlink: a full disk frees space then
        tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from None
        raise


# mkstemp's names: "." + the final name + "." + 8 characters from [a-z0-9_] + ".tmp" (see atomic_path)
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_temp_leftovers(folder: Path, final_pattern: str, final_names: Collection[str] | None = None) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` made in ``folder`` for outputs named like
    ``final_pattern`` (fnmatch, e.g. ``*.h5``) that a killed process left behind; returns them.
    With ``final_names``, only those of outputs so named (a shard's own files, beside other shards').

    Call it only while holding :func:`exclusive_output` on ``folder``: a live writer's temp file would
    otherwise go too. Nothing else is touched: only names of exactly this temp shape match."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if final_names is not None and (not match or match["final"] not in final_names):
            continue
        if match and fnmatch.fnmatchcase(match["final"], final_pattern) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def exclusive_output(folder: Path, step: str, lock_name: str = ".histomil.lock") -> Iterator[None]:
    """Hold an exclusive lock on an output folder for one step (``lock_name``, released when the
    process ends, even by kill -9): a second process writing there is refused in one line. Shards of
    one sharded extraction each hold a lock of their own (:mod:`histomil.features.shards`)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / lock_name, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise HistomilError(
            f"{folder}: another histomil process is writing here ({step}); wait for it to finish or use another output folder"
        ) from None
    except OSError as exc:
        raise HistomilError(f"{folder}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


def sanitize(obj: Any) -> Any:
    """A JSON-safe copy of ``obj``: NaN/inf -> None, numpy scalars/arrays -> Python, paths -> str.

    Dict keys become strings; tuples and sets become lists. Other types raise TypeError, so a
    result that cannot be written is caught here rather than as a half-written file.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return sanitize(obj.tolist())
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [sanitize(v) for v in items]
    raise TypeError(f"sanitize: cannot convert {type(obj).__name__} to JSON")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; a failure names the file in one line."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise HistomilError(f"{path}: cannot write: {e.strerror or e}") from None
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN -> null, numpy -> Python) atomically; returns the path."""
    text = json.dumps(sanitize(obj), indent=2, allow_nan=False) + "\n"
    return write_bytes(path, text.encode("utf-8"))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: 'tile2' < 'tile10', '9' < '10'."""
    parts = re.split(r"([0-9]+)", text)
    primary = tuple((0, int(p)) if p[0] in "0123456789" else (1, p.lower()) for p in parts if p)
    return primary, text  # ties ('01' vs '1', 'A' vs 'a') broken by the plain text

"""One reader for the CSV tables users write (labels, tile tables, manifests, cohort and target tables).

:func:`read_csv_rows` gives the header as written and every non-blank row keyed by the lower-cased,
stripped column names, with its line number for messages. Every way a file can be unreadable (missing,
a folder, not UTF-8, not CSV, a column named twice) is one error line naming the file and what it was
meant to be; what a table must contain is the caller's check.
"""

from __future__ import annotations

import csv
from pathlib import Path

from histomil.errors import HistomilError

Rows = list[tuple[int, dict[str, str]]]


def read_csv_rows(path: str | Path, what: str) -> tuple[list[str], Rows]:
    """``(column names as written, [(line number, {lower-cased column: stripped cell})])`` of ``path``;
    blank lines are skipped, a short row's missing cells are empty strings. ``what`` names the table
    in messages ("labels CSV", "cohort table", ...)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise HistomilError(f"{path}: {what} is empty (no header line)")
            names = [c.strip() for c in header]
            lowered = [n.lower() for n in names]
            dup = next((n for i, n in enumerate(lowered) if n and n in lowered[:i]), None)
            if dup is not None:
                raise HistomilError(f"{path}: {what} has the column {dup!r} twice")
            rows: Rows = []
            for record in reader:
                if not any(cell.strip() for cell in record):
                    continue
                rows.append((reader.line_num, {n: (record[i].strip() if i < len(record) else "") for i, n in enumerate(lowered)}))
    except FileNotFoundError:
        raise HistomilError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise HistomilError(f"{path}: {what} is a folder, not a CSV file") from None
    except UnicodeDecodeError:
        raise HistomilError(f"{path}: {what} is not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise HistomilError(f"{path}: {what} is not a valid CSV ({exc})") from None
    except OSError as exc:
        raise HistomilError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    return names, rows


__all__ = ["Rows", "read_csv_rows"]

"""One table writer for the whole project: benchmarks, ``python -m lkfast.bench`` and the
evaluation report all write their tables through these functions, so every table has the same
markdown dialect and a CSV twin with the same cells.

    markdown_table(header, rows, align=None, caption=None) -> str
    csv_text(header, rows) -> str
    write_table(stem, header, rows, align=None, caption=None) -> (Path of .md, Path of .csv)

Cells are formatted by ``format_cell``: None -> "—", floats with ``digits`` decimals (default 2),
everything else with ``str``. Numbers are right-aligned by default.
"""
from __future__ import annotations

import csv
import errno
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

MISSING = "—"


def format_cell(value, digits: int = 2) -> str:
    """The text of one cell: None or NaN -> "—", a float with ``digits`` decimals, else str()."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        return f"{value:.{digits}f}"
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _alignments(rows: Sequence[Sequence], n: int, align: Optional[str]) -> str:
    if align is not None:
        if len(align) != n or set(align) - set("lrc"):
            raise ValueError(f"align must be {n} letters from 'l', 'r', 'c' (one per column), got {align!r}")
        return align
    out = []
    for j in range(n):
        column = [r[j] for r in rows if j < len(r) and r[j] is not None]
        out.append("r" if column and all(_is_number(v) for v in column) else "l")
    return "".join(out)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None,
                   caption: Optional[str] = None, digits: int = 2) -> str:
    """A GitHub-flavoured markdown table (with an optional caption paragraph above it).

    header: column names. rows: sequences of cells, each as long as ``header``. align: one letter
    per column ('l', 'r', 'c'); by default numeric columns are right-aligned. Raises ValueError for
    a row of the wrong length (naming the row)."""
    rows = [list(r) for r in rows]
    n = len(header)
    for i, r in enumerate(rows):
        if len(r) != n:
            raise ValueError(f"markdown_table: row {i} has {len(r)} cells, the header has {n}: {r!r}")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = []
    if caption:
        lines += [caption, ""]
    lines.append("| " + " | ".join(str(h) for h in header) + " |")
    lines.append("| " + " | ".join(rule[a] for a in _alignments(rows, n, align)) + " |")
    for r in rows:
        lines.append("| " + " | ".join(format_cell(v, digits).replace("|", "\\|") for v in r) + " |")
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """The same table as CSV; numbers keep full precision, None becomes an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(header))
    for r in rows:
        writer.writerow(["" if v is None else v for v in r])
    return buffer.getvalue()


def readable_as_umask_allows(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file the mode a plain ``open`` would (0666 less the umask):
    mkstemp makes files private (0600), and results in a shared folder are not."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


# What the writing of results, caches and checkpoints can fail with for want of space or rights: the
# command-line tools say these in one line (free space or fix the folder, then rerun); any other
# OSError (an unreadable image, a network error between ranks) keeps its traceback.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def save_figure_atomic(fig, path, dpi: int = 120) -> Path:
    """``fig.savefig`` as a PNG to ``path`` through a temporary file of this process's own and a
    rename: a reader never sees half a PNG, and two processes writing the same figure (two runs
    into one --out) do not write into one temporary file."""
    return _write_atomic(path, ".tmp.png", "wb", lambda f: fig.savefig(f, dpi=dpi, format="png"))


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    return _write_atomic(path, ".tmp", "w", lambda f: f.write(text))


def write_bytes_atomic(path, data) -> Path:
    """Write ``data`` (bytes or a buffer) to ``path`` as write_text_atomic writes text."""
    return _write_atomic(path, ".tmp", "wb", lambda f: f.write(data))


def _write_atomic(path, suffix: str, mode: str, write) -> Path:
    """``write(file)`` into a temporary file of this process's own beside ``path`` (mkstemp, then the
    mode the umask allows), renamed to ``path`` when done; removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        readable_as_umask_allows(fd)
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_table(stem, header: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None,
                caption: Optional[str] = None, digits: int = 2) -> tuple[Path, Path]:
    """Write ``stem.md`` (markdown, with the caption) and ``stem.csv`` (the raw cells); returns both paths."""
    rows = [list(r) for r in rows]
    stem = Path(stem)
    md = write_text_atomic(stem.with_suffix(".md"), markdown_table(header, rows, align, caption, digits))
    csv_path = write_text_atomic(stem.with_suffix(".csv"), csv_text(header, rows))
    return md, csv_path


__all__ = ["markdown_table", "csv_text", "write_table", "write_text_atomic", "readable_as_umask_allows",
           "format_cell", "MISSING"]

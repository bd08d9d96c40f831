"""One table writer for the whole project: benchmarks, ``python -m lkfast.bench`` and the
evaluation report all write their tables through these functions, so every table has the same
markdown dialect and a CSV twin with the same cells.

    markdown_table(header, rows, align=None, caption=None) -> str
    csv_text(header, rows) -> str
    write_table(stem, header, rows, align=None, caption=None) -> (Path of .md, Path of .csv)

Cells are formatted by ``format_cell``: None -> "—", floats with ``digits`` decimals (default 2),
everything else with ``str``. Numbers are right-aligned by default.

Files are written through the project's one atomic writer, here as well (lkfast.data, the eval's
cache, train's checkpoints and the report use it too):

    write_atomic(path, write, mode="wb") -> Path     write_text_atomic / write_bytes_atomic / save_figure_atomic
    temporary_files(folder) -> [Path]                what writers killed midway left there
"""
from __future__ import annotations

import csv
import errno
import io
import math
import os
import re
import secrets
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from lkfast.cache import process_gone

MISSING = "—"


def format_cell(value, digits: int = 2) -> str:
    """The text of one cell: None or NaN -> "—", a float with ``digits`` decimals (no sign when it rounds
    to zero), else str()."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        text = f"{value:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # -0.0001 -> "0.00", not "-0.00"
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


# What the writing of results, caches and checkpoints can fail with for want of space or rights: the
# command-line tools say these in one line (free space or fix the folder, then rerun); any other
# OSError (an unreadable image, a network error between ranks) keeps its traceback.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def save_figure_atomic(fig, path, dpi: int = 120) -> Path:
    """``fig.savefig`` as a PNG to ``path`` through a temporary file of this call's own and a
    rename (see ``write_atomic``): a reader never sees half a PNG, and two processes writing the
    same figure (two runs into one --out) do not write into one temporary file."""
    return write_atomic(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    return write_atomic(path, lambda f: f.write(text), mode="w")


def write_bytes_atomic(path, data) -> Path:
    """Write ``data`` (bytes or a buffer) to ``path`` as write_text_atomic writes text."""
    return write_atomic(path, lambda f: f.write(data))


def _temporary_name(path: Path, suffix: str) -> str:
    """``.<name><suffix>``, the name cut short where the whole would pass the file system's limit on a
    name (255 bytes mostly), so that a name near the limit can still be written (the suffix keeps it
    unique, and ``temporary_files`` finds it)."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    name = path.name
    while len(os.fsencode(f".{name}{suffix}")) > limit and len(name) > 1:
        name = name[:-1]  # whole characters, not bytes: a multi-byte one is never split
    return f".{name}{suffix}"


def write_atomic(path, write: Callable, mode: str = "wb") -> Path:
    """The one atomic writer: ``write(file)`` into a temporary file beside ``path``, renamed over
    ``path`` (os.replace, atomic on one file system) when done, so ``path`` never holds a partial
    file; parent folders are created; returns ``path``. The temporary file
    (``.<name>.<random>.tmp<pid>``, the name cut short near the file system's limit on a name) is
    this call's own (two threads or processes writing one path
    never share one), opened with ``open(name, mode)`` so it gets the mode a plain open gives
    (0666 less the umask), and removed if anything fails; a process killed midway leaves it, for
    ``temporary_files`` to find. ``mode``: "wb" or "w"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_temporary_name(path, f".{secrets.token_hex(4)}.tmp{os.getpid()}"))
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# write_atomic's temporary names, exactly: .<name>.<8 hex digits>.tmp<pid>. (Looser, a user's own
# .notes.tmp123 was taken for one and deleted; the .<name>.tmp<pid> of before 7b93f8d is no longer matched.)
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp([0-9]+)")


def check_writable(folder) -> None:
    """Create ``folder`` and write and remove a file in it: OSError where that fails (read-only, no
    permission, a full disk), for the CLIs to say before their work rather than lose it at the end."""
    import tempfile

    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".lkfast-write-check-", dir=folder)
    try:
        os.write(fd, b"lkfast")
    finally:
        os.close(fd)
        os.unlink(probe)


def temporary_files(folder, stale_only: bool = True) -> list[Path]:
    """Temporary files that write_atomic left in ``folder`` (not recursive): those of runs killed
    before the rename. With ``stale_only`` (default), only those whose writing process (the pid in
    the name) is no longer running on this machine, so a concurrent run's file is never listed.
    [] if ``folder`` does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        match = _TEMPORARY.fullmatch(p.name)
        if match and p.is_file() and (not stale_only or process_gone(int(match.group(1)))):
            found.append(p)
    return sorted(found)


def write_table(stem, header: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None,
                caption: Optional[str] = None, digits: int = 2, csv: Optional[tuple] = None) -> tuple[Path, Path]:
    """Write ``stem.md`` (markdown, with the caption) and ``stem.csv`` (the raw cells); returns both paths.
    A column name the header repeats ("paper" beside each measured column) is named after the column
    before it in the CSV ("paper (ImageNet-A)"), so every CSV column has a name of its own. ``csv``:
    (header, rows) for the CSV where it holds other columns than the markdown (numbers where the
    markdown shows text such as "29.4 (+2.7)")."""
    rows = [list(r) for r in rows]
    stem = Path(stem)
    md = write_text_atomic(stem.with_suffix(".md"), markdown_table(header, rows, align, caption, digits))
    csv_head, csv_rows = (header, rows) if csv is None else (csv[0], [list(r) for r in csv[1]])
    csv_path = write_text_atomic(stem.with_suffix(".csv"), csv_text(csv_header(csv_head), csv_rows))
    return md, csv_path


def csv_header(header: Sequence[str]) -> list:
    """``header`` with each name that occurs more than once, after the first column, followed by the
    name of the column before it in parentheses."""
    names = [str(h) for h in header]
    repeated = {h for h in names if names.count(h) > 1}
    return [f"{h} ({names[i - 1]})" if h in repeated and i > 0 else h for i, h in enumerate(names)]


__all__ = ["markdown_table", "csv_text", "csv_header", "write_table", "write_atomic", "write_text_atomic", "write_bytes_atomic",
           "save_figure_atomic", "temporary_files", "format_cell", "MISSING"]

"""Backend choice on CUDA tensors: a table measured on GPUs, shipped as data (cuda_table.json).

Each row is one benchmarked case and the fastest backend of each pass there:

    key   (gpu, dtype, layout, kh, kw, N, C, H, W)    e.g. ("NVIDIA H200", "float16", "channels_last", 31, 31, 64, 128, 56, 56)
    value (forward, input_grad, weight_grad)          each "cuda", "triton", "triton_mma" or "torch"

``gpu`` is ``torch.cuda.get_device_name()``, ``dtype`` a short dtype name (``dtype_name``),
``layout`` "nchw" or "channels_last" (what the op computes in: ``layout_of``). "torch" is PyTorch
(cuDNN for channels_last, its own depthwise kernel for NCHW).

How ``auto`` uses it (``choose``), for a call on a GPU:

* only rows of the same GPU name, dtype and layout count; a row measured on another GPU says nothing
  about this one;
* the row of the call's own key, else the nearest such row (in log kernel size, log batch, log
  channels and log map area), gives each pass's backend;
* a measured winner that cannot run this call is replaced by "torch", never by a backend that lost
  on that row, so ``auto`` is never slower than PyTorch where the table was measured;
* with no row for this GPU, dtype and layout, the unmeasured default order applies: lkfast's CUDA
  kernels, then Triton, then PyTorch (first that can run the call).

The table is read from ``cuda_table.json`` beside this module (package data), or from the file
named by the environment variable ``LKFAST_CUDA_TABLE`` when it is set. Both are looked up when a
CUDA call needs the table (not at import); the file is parsed again only when it changes. The op
keeps each call's choice per exact shape, strides, dtype and device against the file's stamp
(``table_stamp``: path, time, inode, size), so a call costs one environment read and one ``stat``
once its shape was seen, and a rewritten or another file is seen at the next call.

``benchmarks/bench_gpu.py --write-table RESULTS.json`` writes the shipped file from a GPU run with
``save_table(rows, measured_on=f"{gpu name}, {date}")``, rows being its fastest backend per pass
and key; to try a table without touching the package, ``save_table(rows, measured_on, path)`` to
another file and set ``LKFAST_CUDA_TABLE`` to it (in the same process too: it is read per call).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from lkfast.ops.backends import FLOAT_DTYPES, Plan, dtype_name, getenv, output_memory_format, remembered

DEFAULT_ORDER = ("cuda", "triton", "torch")
# triton_mma (the tensor-core kernels) is never in the default order: auto takes it only where a
# measured row says it won.
TABLE_BACKENDS = ("cuda", "triton", "triton_mma", "torch")
LAYOUTS = ("nchw", "channels_last")
SHIPPED_PATH = Path(__file__).with_name("cuda_table.json")
ENV_VAR = "LKFAST_CUDA_TABLE"
FORMAT = 1


class Key(NamedTuple):
    """The table key of one call; a plain 9-tuple in this order compares equal to it."""

    gpu: str
    dtype: str
    layout: str
    kh: int
    kw: int
    N: int
    C: int
    H: int
    W: int

    def __str__(self):
        return (f"{self.gpu}, {self.dtype}, {self.layout}, kernel {self.kh}x{self.kw}, "
                f"N={self.N} C={self.C} {self.H}x{self.W}")


class Table(NamedTuple):
    """A measured table: ``rows`` maps Key -> Plan; ``measured_on`` says which GPU run made it;
    ``path`` is the file it came from."""

    rows: Mapping[Key, Plan]
    measured_on: str
    path: str


def layout_of(x: torch.Tensor) -> str:
    """The layout the op computes in and returns (see backends.output_memory_format)."""
    return "channels_last" if output_memory_format(x) == torch.channels_last else "nchw"


@functools.lru_cache(maxsize=16)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def key_of(x: torch.Tensor, weight: torch.Tensor, gpu: str | None = None) -> Key:
    """The table key of a call. ``gpu``: the GPU name to file it under; by default the name of
    x's CUDA device (required for tensors that are not on a GPU)."""
    if gpu is None:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_table.key_of: x is on {x.device}, not a GPU; pass gpu=<name> to key a CPU tensor")
        gpu = _gpu_name(x.device.index if x.device.index is not None else torch.cuda.current_device())
    N, C, H, W = (int(s) for s in x.shape)
    return Key(gpu, dtype_name(x.dtype), layout_of(x), int(weight.shape[2]), int(weight.shape[3]), N, C, H, W)


# ---------------------------------------------------------------------------------------------
# The file


def _check_row(key, value) -> tuple[Key, Plan]:
    """The row as (Key, Plan), or a ValueError naming what is wrong with it."""
    try:
        key = Key(*key)
    except TypeError:
        raise ValueError(f"cuda table: a key must be (gpu, dtype, layout, kh, kw, N, C, H, W), got {key!r}") from None
    names = {dtype_name(d) for d in FLOAT_DTYPES}
    problems = []
    if not isinstance(key.gpu, str) or not key.gpu:
        problems.append(f"gpu must be a GPU name (torch.cuda.get_device_name()), got {key.gpu!r}")
    if key.dtype not in names:
        problems.append(f"dtype must be one of {', '.join(sorted(names))}, got {key.dtype!r}")
    if key.layout not in LAYOUTS:
        problems.append(f"layout must be one of {', '.join(LAYOUTS)}, got {key.layout!r}")
    sizes = key[3:]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        problems.append(f"kh, kw, N, C, H, W must be positive integers, got {tuple(sizes)!r}")
    try:
        plan = Plan(*value)
    except TypeError:
        plan = None
        problems.append(f"the value must be (forward, input_grad, weight_grad) backends, got {value!r}")
    if plan is not None and any(name not in TABLE_BACKENDS for name in plan):
        problems.append(f"backends must be among {', '.join(TABLE_BACKENDS)}, got {tuple(plan)!r}")
    if problems:
        raise ValueError(f"cuda table: bad row {tuple(key)!r}: " + "; ".join(problems))
    return key, plan


def _rows_of(rows) -> Iterable[tuple]:
    return rows.items() if isinstance(rows, Mapping) else rows


def save_table(rows, measured_on: str, path: str | os.PathLike | None = None) -> Path:
    """Write a measured table as JSON and return its path.

    rows: a mapping ``{(gpu, dtype, layout, kh, kw, N, C, H, W): (forward, input_grad, weight_grad)}``
    or an iterable of such ``(key, value)`` pairs (what bench_gpu.py keeps in its results).
    measured_on: which run measured it, e.g. "NVIDIA H200, 2026-11-29". path: where to write; by
    default the table shipped with the package (lkfast/ops/cuda_table.json, to be committed).
    Raises ValueError naming the first bad row (an unknown dtype, layout or backend, a key of the
    wrong length). The file is replaced atomically; the next CUDA call reads it.
    """
    checked = dict(_check_row(k, v) for k, v in _rows_of(rows))
    header = {"format": FORMAT, "measured_on": str(measured_on), "key": list(Key._fields), "value": list(Plan._fields)}
    lines = [f" {json.dumps(name)}: {json.dumps(value)}," for name, value in header.items()]
    body = ",\n".join(f"  {json.dumps([list(k), list(v)])}" for k, v in sorted(checked.items()))
    text = "{\n" + "\n".join(lines) + '\n "rows": [' + (f"\n{body}\n " if body else "") + "]\n}\n"
    from lkfast.tables import write_text_atomic

    target = Path(path) if path is not None else SHIPPED_PATH
    write_text_atomic(target, text)  # one row per line: a new GPU run reads as a diff
    return target


@functools.lru_cache(maxsize=8)
def _parse(path: str, stamp: tuple) -> Table:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cuda table {path} is not valid JSON ({exc}); rewrite it with cuda_table.save_table") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("rows"), list):
        raise ValueError(f"cuda table {path}: expected a JSON object with format {FORMAT} and a list of rows "
                         f"(as cuda_table.save_table writes), got {str(data)[:120]!r}")
    rows = {}
    for row in data["rows"]:
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            raise ValueError(f"cuda table {path}: each row must be [key, value], got {row!r}")
        key, plan = _check_row(*row)
        rows[key] = plan
    return Table(rows, str(data.get("measured_on", "")), path)


def _table_file() -> tuple[str, bool]:
    """(the file ``auto`` reads now, whether LKFAST_CUDA_TABLE named it); read on every auto call on
    CUDA (backends.getenv)."""
    override = getenv(ENV_VAR)
    return (override, True) if override else (_SHIPPED, False)


_SHIPPED = str(SHIPPED_PATH)


def table_path() -> Path:
    """The file ``auto`` reads now: LKFAST_CUDA_TABLE when set, else the shipped cuda_table.json."""
    return Path(_table_file()[0])


def _stamp(target: str, named_by_env: bool) -> tuple:
    try:
        st = os.stat(target)
    except FileNotFoundError:
        hint = (f" (named by {ENV_VAR}; unset it or point it at a file written by cuda_table.save_table)"
                if named_by_env else "")
        raise FileNotFoundError(f"cuda table {Path(target)} does not exist{hint}") from None
    return target, st.st_mtime_ns, st.st_ino, st.st_size


def table_stamp() -> tuple:
    """What tells the table ``auto`` reads now from any other: ``(path, mtime_ns, inode, size)`` of
    ``table_path()``'s file (a file rewritten, or another file named, is another stamp). The op keeps
    each choice against it (lkfast.ops.depthwise); one environment read and one ``stat`` (~2 us of
    the ~5 of ``load_table``). FileNotFoundError as ``load_table``."""
    return _stamp(*_table_file())


def load_table(path: str | os.PathLike | None = None) -> Table:
    """The table in ``path`` (by default ``table_path()``), parsed again only when the file changed.

    Raises FileNotFoundError when the file is missing (naming LKFAST_CUDA_TABLE when that is what
    points there) and ValueError for a file that is not a table written by ``save_table``."""
    stamp = table_stamp() if path is None else _stamp(os.fspath(path), False)
    return _parse(str(Path(stamp[0])), stamp[1:])


# ---------------------------------------------------------------------------------------------
# The choice


def _distance(a: Key, b: Key) -> float:
    log = lambda p, q: abs(math.log(max(p, 1)) - math.log(max(q, 1)))  # noqa: E731
    return log(a.kh, b.kh) + log(a.kw, b.kw) + log(a.N, b.N) + log(a.C, b.C) + log(a.H * a.W, b.H * b.W)


def lookup(key: Key, table: Table | Mapping | None = None) -> tuple[Key, Plan] | None:
    """The row (its key and plan) for ``key``: its own if measured, else the nearest row of the same
    GPU name, dtype and layout; None when there is no such row. ``table``: a Table, a mapping of
    rows, or None for ``load_table()``."""
    table = load_table() if table is None else table
    rows = table.rows if isinstance(table, Table) else table
    key = Key(*key)
    if key in rows:
        return key, Plan(*rows[key])
    same = [Key(*k) for k in rows if tuple(k[:3]) == tuple(key[:3])]
    if not same:
        return None
    nearest = min(same, key=lambda k: (_distance(k, key), k))
    return nearest, Plan(*rows[nearest])


def choose(x: torch.Tensor, weight: torch.Tensor, usable: Callable[[str], bool], *,
           gpu: str | None = None, table: Table | None = None) -> tuple[Plan, str]:
    """The plan for a CUDA call and a sentence saying where it came from.

    usable(name): whether backend ``name`` can run this call. gpu: the GPU name to look up (default:
    x's device; tests pass one for CPU tensors). table: default ``load_table()``. Under
    ``torch.compile`` the op asks this when it runs, with the real tensors (lkfast.ops.depthwise's
    AUTO), never while tracing."""
    key = key_of(x, weight, gpu)
    runnable = tuple(name for name in TABLE_BACKENDS if usable(name))
    table = load_table() if table is None else table
    # The op asks on every call, and the nearest-row search and its sentence cost ~3 us per table
    # row in Python (580 us for a 200-row table on a Zen 5 core: benchmarks/results/
    # host_overhead_cpu_zen5.md; a stage-4 kernel takes ~30 us on an H200). A choice is kept
    # per (key, runnable) for as long as the table is the same (load_table parses a changed file
    # into a new one; a Table is not to be changed in place).
    return remembered(_CHOICES, (key, runnable), table, lambda: _choose_in(table, key, runnable))


_CHOICES: dict = {}  # (Key, runnable backends) -> (the Table it was chosen from, (plan, source))


def _choose_in(table: Table, key: Key, runnable: tuple[str, ...]) -> tuple[Plan, str]:
    found = lookup(key, table)
    if found is None:
        first = next((name for name in DEFAULT_ORDER if name in runnable), "torch")
        return Plan.single(first), (
            f"no row measured on {key.gpu} for {key.dtype} {key.layout} in {table.path}: the unmeasured default "
            f"order {' > '.join(DEFAULT_ORDER)}, first that can run the call")
    row, measured = found
    where = "measured at this call's key" if row == key else f"nearest measured row ({row}) to this call ({key})"
    source = f"{where} in {table.path} ({table.measured_on or 'run not named'})"
    plan = Plan(*(name if name in runnable else "torch" for name in measured))
    replaced = [f"{p}: {m} cannot run this call" for p, m, n in zip(Plan._fields, measured, plan) if m != n]
    if replaced:
        source += "; measured winner replaced by torch (" + ", ".join(replaced) + ")"
    return plan, source

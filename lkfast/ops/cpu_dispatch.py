"""Backend choice on the CPU by measurement: lkfast's C++ kernel or PyTorch's best layout, per pass.

Which of the two is faster depends on the machine, dtype, layout and shape: lkfast's first forward
kernels ran at 0.54-0.74x oneDNN's channels_last path on an AVX2-only EPYC (2026-11-29); today's run
1.8-2.7x it at RepLKNet-31B's stage shapes on a Zen 3, where PyTorch's NCHW path still wins some of
ConvNeXt-T's 7x7 forwards in fp32, and the training step, lkfast's weight gradient above all, ran
2.3-100x PyTorch's everywhere it was measured. So
``auto`` decides each (pass, dtype, shape class) from measurements, in this order:

1. **This machine's calibration** (the default, like ``torch.backends.cudnn.benchmark``): the first
   call of a shape class times both candidates on tensors of the call's shape and layout (a few
   interleaved rounds, stopping early when one is clearly faster) and caches the winner in
   ``<cache>/cpu_dispatch-<digest>.json`` (``<cache>`` = ``$LKFAST_CACHE`` or ``~/.cache/lkfast``),
   one file per fingerprint of the machine (CPU model, instruction set lkfast runs, thread count,
   oneDNN cap, lkfast and torch versions, the sources the kernels were built from; ``cache_path``): processes with another thread count (a
   data-loader worker, a torchrun rank) or cap keep their own choices side by side instead of
   overwriting each other's. A file whose recorded fingerprint is not the one its name stands for
   is stale and starts afresh; a file that does not parse or fails its checksum is corrupt,
   reported with a warning and rebuilt, never trusted.
2. **The shipped table** ``cpu_table.json`` (measured per instruction set by
   ``benchmarks/make_cpu_table.py``, nearest row in log kernel size, batch, channels and map area) when
   calibration is off (``LKFAST_CALIBRATE=0``), while ``torch.compile`` traces, or when the
   measurement cannot run.
3. **The built-in rule** when the table has no row for the case (it has none for fp16): lkfast's
   kernel for every pass in fp32/fp64, and for the fp16/bf16 forward where PyTorch does not run that
   dtype through oneDNN on this CPU (its own check, ``torch_uses_onednn``: it falls back to a generic
   convolution, 7-100x slower than lkfast's at real layer shapes on an AVX2-only EPYC); oneDNN for
   the fp16/bf16 forward where it does.

The input gradient is the forward convolution of the output gradient with the rotated kernel (same
shapes, same cost), so it follows the forward's choice. Every choice comes with a sentence saying
where it came from, which ``plan_for(..., explain=True)`` shows.

PyTorch's side of a forward is timed in each layout it may run in (``TorchBackend.cpu_forward_layouts``):
for an input that is not channels_last both a channels_last copy ("torch", oneDNN's channels_last
kernel) and the input as it is ("torch_nchw", PyTorch's NCHW path), and the entry records the faster as
``torch_layout``, which the torch backend then runs (``torch_forward_layout``). Where PyTorch's NCHW
path won the forward (bf16 at ConvNeXt-T's 7x7 shapes on the Zen 5), timing only the copy had handed
the call to lkfast's kernel or to the copy, each slower than plain ``F.conv2d`` on the same tensor.
With calibration off the torch backend runs the copy, as the shipped table was measured.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from lkfast.cache import _build_lock, cache_dir
from lkfast.ops import backends
from lkfast.ops.backends import dtype_name, getenv, output_memory_format

CANDIDATES = ("cpu", "torch")
# What a forward's calibration times on PyTorch's side, per layout (TorchBackend.cpu_forward_layouts):
# the name of the timing, and the backend and layout it stands for
TORCH_TIMINGS = {"torch": "channels_last", "torch_nchw": "nchw"}
TIMED = CANDIDATES + ("torch_nchw",)
TORCH_LAYOUTS = tuple(TORCH_TIMINGS.values())
# 1x1 convolutions (lkfast.nn.pointwise): a matrix product on the NHWC view, or PyTorch's convolution
POINTWISE_CANDIDATES = ("matmul", "conv")
MEASURED_PASSES = ("forward", "weight_grad")  # the input gradient follows the forward
SCHEMA = 1
CACHE_PREFIX = "cpu_dispatch-"  # + a digest of the fingerprint + ".json" (see cache_path)
TABLE_PATH = Path(__file__).with_name("cpu_table.json")
_TABLE_PATH_TEXT = str(TABLE_PATH)  # (the key of _load_table's cache, built once)
OWN_FORWARD_DTYPES = (torch.float32, torch.float64)  # the built-in rule (3. above)
_generations = itertools.count()  # every Calibration object gets its own number (see memo_token)


def _bucket(n: int) -> int:
    """The power of two at or above n: shapes in one bucket share a measurement."""
    return 1 << max(0, int(n) - 1).bit_length()


def shape_class(x_shape, kh: int, kw: int, dtype: torch.dtype, channels_last: bool) -> tuple:
    """(dtype, layout, kh, kw, N, C, H, W) with N, C, H, W rounded up to powers of two."""
    n, c, h, w = (int(s) for s in x_shape)
    layout = "channels_last" if channels_last else "nchw"
    return (dtype_name(dtype), layout, int(kh), int(kw), _bucket(n), _bucket(c), _bucket(h), _bucket(w))


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_isa_of: tuple = (None, "none")  # (the lkfast._C module asked, its answer): asked once per build loaded


def _isa() -> str:
    """The instruction set lkfast's C++ kernels run ("avx2", "avx512", ...; "none" without them).
    Kept per extension module (LKFAST_CPU_ISA is read once, when it loads): asking it took 1 us of
    the ~4 us that ``choices_token`` spends on every call with calibration off."""
    global _isa_of
    from lkfast import _ext

    ext = _ext._C
    if ext is None:
        return "none"
    if _isa_of[0] is not ext:
        _isa_of = (ext, ext.cpu_isa())
    return _isa_of[1]


def fingerprint() -> dict:
    """What a calibration is valid for: the same CPU, instruction set, threads and versions, and the
    same build of the kernels (the sources lkfast._C was built from: a rebuilt kernel that got faster
    or slower is measured again, where the version number alone would keep the old choice)."""
    from lkfast import __version__, _ext

    return {
        "cpu": _cpu_model(),
        "isa": _isa(),
        "threads": torch.get_num_threads(),
        "lkfast": __version__,
        "kernels": _ext.sources or "unrecorded",
        "torch": torch.__version__,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        # what is timed: a calibration made before PyTorch's NCHW forward was a candidate is not reused
        "timed": ",".join(TIMED),
    }


def calibration_enabled() -> bool:
    """LKFAST_CALIBRATE: 1 (measure on this machine, the default) or 0; another value raises
    ValueError (a 'false' or 'no' used to leave the measuring on, silently)."""
    value = getenv("LKFAST_CALIBRATE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"LKFAST_CALIBRATE={value!r}: expected 0 (no measuring on this machine: the shipped "
                         f"table chooses) or 1 (measure, the default)")
    return value == "1"


def _checksum(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _key_text(key: tuple) -> str:
    return "|".join(str(k) for k in key)


@dataclasses.dataclass
class Choice:
    backend: str
    source: str  # one sentence: where the choice came from


class Calibration:
    """The measured choices of one machine, kept in a JSON file (see the module docstring)."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.entries: dict[str, dict] = {}
        self.status = "new"  # new | loaded | stale | corrupt
        self._lock = threading.Lock()
        self.generation = next(_generations)
        self._load()

    _UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError)

    def _read(self) -> Optional[dict]:
        """The file's entries; None where it records another fingerprint. Raises one of
        ``_UNREADABLE`` where it is missing or damaged."""
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, expected {SCHEMA}")
        entries = data["entries"]
        if not isinstance(entries, dict) or data.get("checksum") != _checksum(entries):
            raise ValueError("checksum mismatch (partial or edited file)")
        for value in entries.values():
            if value.get("backend") not in CANDIDATES + POINTWISE_CANDIDATES:
                raise ValueError(f"unknown backend {value.get('backend')!r}")
            if value.get("torch_layout", "channels_last") not in TORCH_LAYOUTS:
                raise ValueError(f"unknown torch_layout {value.get('torch_layout')!r}")
        return entries if data.get("fingerprint") == self.fingerprint else None

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            entries = self._read()
        except self._UNREADABLE as error:
            warnings.warn(f"lkfast: the CPU calibration cache {self.path} is corrupt ({error}); "
                          "it will be measured again and rewritten", RuntimeWarning, stacklevel=3)
            self.status = "corrupt"
            return
        if entries is None:
            self.status = "stale"  # another machine, thread count or version: measure afresh
            return
        self.entries = entries
        self.status = "loaded"

    def get(self, key: tuple) -> Optional[dict]:
        return self.entries.get(_key_text(key))

    def put(self, key: tuple, entry: dict) -> None:
        """Remember ``entry`` and write the file: under a lock shared with the other processes of this
        fingerprint (torchrun ranks, parallel jobs: the same thread count), merged with what they
        wrote since this process read it (rewriting its own entries alone lost theirs)."""
        from lkfast.tables import write_text_atomic

        with self._lock, contextlib.ExitStack() as held:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(_build_lock(self.path))
            except OSError:  # no lock file where the cache cannot be written: the write below says so
                pass
            try:
                others = self._read() or {}
            except self._UNREADABLE:  # missing, or damaged: this process's entries replace it
                others = {}
            self.entries = {**others, **self.entries, _key_text(key): entry}
            data = {"schema": SCHEMA, "fingerprint": self.fingerprint, "entries": self.entries,
                    "checksum": _checksum(self.entries)}
            try:
                write_text_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))
            except OSError as error:  # a read-only home: keep the choice for this process only
                warnings.warn(f"lkfast: cannot write the CPU calibration cache {self.path} ({error}); "
                              "set LKFAST_CACHE to a writable folder", RuntimeWarning, stacklevel=3)


_calibration: Optional[Calibration] = None
_calibration_for: Optional[tuple] = None


def cache_path(fp: Optional[dict] = None) -> Path:
    """The calibration file of a fingerprint (default: this process's): ``<cache>/cpu_dispatch-<digest>.json``."""
    fp = fingerprint() if fp is None else fp
    return cache_dir() / f"{CACHE_PREFIX}{_checksum(fp)[:16]}.json"


def calibration() -> Calibration:
    """This process's calibration, opened on first use (and again if LKFAST_CACHE, the thread count
    or the oneDNN cap change). Cheap on every call after the first: the op asks on each call."""
    global _calibration, _calibration_for
    settings = (getenv("LKFAST_CACHE"), torch.get_num_threads(), getenv("ONEDNN_MAX_CPU_ISA"))
    if _calibration is None or settings != _calibration_for:
        fp = fingerprint()
        path = cache_path(fp)
        if _calibration is None or _calibration.path != path or _calibration.fingerprint != fp:
            _calibration = Calibration(path, fp)
        _calibration_for = settings
    return _calibration


def memo_token() -> Optional[int]:
    """What a memo of this process's choices is valid for: the generation of the calibration in
    use (a new one whenever LKFAST_CACHE, the thread count, the oneDNN cap or the fingerprint
    changes), or None when calibration is off (the table decides; nothing to memoize against)."""
    if not calibration_enabled() or torch.compiler.is_compiling():
        return None
    return calibration().generation


def choices_token():
    """What this process's choices are made from, for memos of them: the calibration in use (its
    generation, as ``memo_token``), or with calibration off the shipped table as loaded, the
    instruction set whose rows are read and whether PyTorch runs fp16 and bf16 through oneDNN (the
    built-in rule's question); None while ``torch.compile`` traces (nothing is kept there). With
    calibration off the choices were worked out afresh on every call until 916b1c9: 0.35-0.62 ms
    of Python a call (the table's 192 rows scanned per pass) on a Zen 3 EPYC
    (benchmarks/results/host_overhead_cpu_zen3.md), more than most of the embedded default run's
    layers take to compute."""
    if torch.compiler.is_compiling():
        return None
    if calibration_enabled():
        return calibration().generation
    return ("shipped table", _isa(), _load_table(_TABLE_PATH_TEXT),
            torch_uses_onednn(torch.float16), torch_uses_onednn(torch.bfloat16))


def remembered(memo: dict, args: tuple, compute: Callable[[], object]):
    """``compute()``, kept in ``memo`` under ``args`` for as long as what the choices are made from
    stays the same (``choices_token``: the calibration in use, or with calibration off the shipped
    table's rows for this instruction set). For choices asked on every call of an op: for one
    calibration or table the answer for a shape cannot change. (The memo rule is
    ``lkfast.ops.backends.remembered``, which the CUDA table's choices use too.)"""
    return backends.remembered(memo, args, choices_token(), compute)


# --- the shipped table ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


# An instruction set whose table may stand in for another's that the table lacks: "avx512bf16" runs the
# AVX-512 code, but for the bf16 forward of packed tiles (pairs of tap rows, vdpbf16ps, faster), so the
# "avx512" rows hold its choices but for those, where they pick lkfast less often than it would win.
TABLE_STAND_IN = {"avx512bf16": "avx512"}


def _table_rows(isa: str, table: Optional[dict] = None) -> list:
    """The rows of ``table`` (default: the shipped one) for an instruction set, or for its stand-in
    (``TABLE_STAND_IN``) where the table has none for it; [] where it has neither."""
    table = _load_table(str(TABLE_PATH)) if table is None else table
    if isa not in table and isa in TABLE_STAND_IN:
        isa = TABLE_STAND_IN[isa]
    return table.get(isa, {}).get("rows", [])


def table_lookup(isa: str, pass_: str, key: tuple, table: Optional[dict] = None) -> Optional[tuple[str, tuple]]:
    """(backend, row key) of the nearest measured row with the same instruction set, pass, dtype
    and layout, or None. Distance: sum of |log| differences of kh, kw, N, C and H*W (the batch
    counts: at ConvNeXt-T's stage-4 shape the forward's winner turned between batch 8 and 32)."""
    rows = [r for r in _table_rows(isa, table) if r["pass"] == pass_ and tuple(r["key"][:2]) == tuple(key[:2])]
    if not rows:
        return None

    def distance(row_key):
        _, _, kh, kw, n, c, h, w = row_key
        d = lambda a, b: abs(math.log(max(a, 1)) - math.log(max(b, 1)))  # noqa: E731
        return d(kh, key[2]) + d(kw, key[3]) + d(n, key[4]) + d(c, key[5]) + d(h * w, key[6] * key[7])

    best = min(rows, key=lambda r: distance(r["key"]))
    return best["backend"], tuple(best["key"])


def table_choices_digest(isa: Optional[str] = None, table: Optional[dict] = None) -> str:
    """A digest of the shipped table's choices for an instruction set (default: the one lkfast
    runs): the (pass, shape class, backend) of every row, not the times, so a re-measurement that
    picks the same backends keeps the digest. What a result computed with the table's choices
    depends on (other backends round differently); "none" where the table has no rows for it."""
    rows = _table_rows(fingerprint()["isa"] if isa is None else isa, table)
    if not rows:
        return "none"
    choices = sorted((r["pass"], [str(k) for k in r["key"]], r["backend"]) for r in rows)
    return hashlib.sha256(json.dumps(choices).encode()).hexdigest()[:16]


# --- measuring ----------------------------------------------------------------------------------


SAMPLE_SECONDS = 0.002  # a timed sample repeats a fast call until it fills about this
MAX_REPEATS = 1000


class Candidate:
    """A callable to time (``run()``) on a batch of ``images``, with ``probe(k)``: the same call on
    the batch's first k images (None: no probe). A call on a whole batch takes at least as long as
    on a part of it, so where a probe alone is clearly slower than the fastest whole call, so is the
    candidate (see ``measure``)."""

    __slots__ = ("run", "probe", "images")

    def __init__(self, run: Callable[[], None], probe: Optional[Callable[[int], None]] = None, images: int = 1):
        self.run, self.probe, self.images = run, probe, images

    def __call__(self):
        return self.run()


class Timings(dict):
    """``measure``'s answer, {name: seconds per call}, with ``bounded``: {name: k} for the names
    whose seconds are a probe's (their call on the batch's first k images), a lower bound on the
    whole call's time."""

    def __init__(self, seconds: dict, bounded: Optional[dict] = None):
        super().__init__(seconds)
        self.bounded = dict(bounded or {})


def _probe(candidate: Candidate, limit: float) -> Optional[tuple[int, float]]:
    """(k, seconds) of a probe of ``candidate`` that took at least ``limit`` seconds, or None where
    none did before the probes would reach the whole batch. The first probe is one image; each next
    one the leading power of two of images that the last probe's time, grown in proportion with
    the images, would take past ``limit`` (at least twice the last): a candidate r times slower than
    ``limit`` is ruled out after probes of ~2/r of the batch, one close to it after one image."""
    k = 1
    while k < candidate.images:
        start = time.perf_counter()
        candidate.probe(k)
        seconds = time.perf_counter() - start
        if seconds >= limit:
            return k, seconds
        k = max(2 * k, 1 << max(0, math.ceil(limit / max(seconds, 1e-9) * k) - 1).bit_length())
    return None


def measure(runs: dict[str, Callable[[], None]], rounds: int = 3, clear_ratio: float = 3.0,
            setup_allowance: float = 0.05) -> Timings:
    """Seconds per call of each callable: the least of interleaved rounds, after one warm-up call
    each; stops after the warm-up when one candidate is ``clear_ratio`` times faster than every other
    even with ``setup_allowance`` seconds taken off the others' warm-up (no need to time a 1.5 s
    PyTorch weight gradient three more times to know a 50 ms kernel wins). The allowance is for
    one-time costs of a first call: oneDNN builds its kernel for a new shape then, which made a 0.3
    ms bf16 forward take 3.6 ms once, and the warm-up alone would have ruled it out
    (make_cpu_table.py at 1e9a030).

    A ``Candidate`` with a probe, after the first candidate, runs probes on leading parts of its
    batch first (``_probe``): where one alone is ruled out that way, the whole call is not made,
    and its time is that probe's (``Timings.bounded`` says how many images). PyTorch's generic
    half-precision convolution, on a CPU where it has no oneDNN path, took 12 s for one bf16
    forward of RepLKNet-31B's stage 1 at batch 8 on a Zen 3 EPYC and 91 s at batch 64, 140-260x
    lkfast's kernel in the forward and weight gradient: a first calibration spent minutes per
    shape class in those whole calls (4-6 s with the probes at batch 64; docs/benchmarks.md).

    A round of a call faster than ``SAMPLE_SECONDS`` repeats it to fill that (its time per call: the
    least of three more calls after the warm-up's setup), and the least round counts, not the median: a stall
    of the scheduler only ever adds time, and on a loaded 2-core machine single calls of 0.025 and
    0.067 ms measured 16-24 ms in some rounds, so the median of three chose on noise, and the
    choice was cached for every later process."""
    warm, bounded = {}, {}
    for name, run in runs.items():
        if getattr(run, "probe", None) is not None and warm:
            probed = _probe(run, clear_ratio * min(warm.values()) + setup_allowance)
            if probed is not None:
                bounded[name], warm[name] = probed
                continue
        start = time.perf_counter()
        run()
        warm[name] = time.perf_counter() - start
    fastest = min(warm.values())
    # a candidate clearly slower than the fastest keeps its warm-up time and is not timed further
    rest = {name: run for name, run in runs.items()
            if not warm[name] - setup_allowance >= clear_ratio * fastest}
    if len(rest) == 1:
        return Timings(warm, bounded)
    from lkfast.timing import time_interleaved

    repeats = {}
    runs = rest
    for name, run in runs.items():
        per_call = warm[name]
        for _ in range(3 if per_call < SAMPLE_SECONDS else 0):  # (the warm-up's time may be mostly setup)
            start = time.perf_counter()
            run()
            per_call = min(per_call, time.perf_counter() - start)
        repeats[name] = max(1, min(MAX_REPEATS, math.ceil(SAMPLE_SECONDS / max(per_call, 1e-9))))
    samples = {name: (lambda run=run, n=repeats[name]: [run() for _ in range(n)]) for name, run in runs.items()}
    times = time_interleaved(samples, rounds, warmup=0)
    return Timings({**warm, **{name: min(t) / repeats[name] for name, t in times.items()}}, bounded)


def _runs(x: torch.Tensor, weight: torch.Tensor, pass_: str) -> dict[str, Callable[[], None]]:
    from lkfast.ops.backends import BACKENDS

    kh, kw = weight.shape[-2:]
    # Fresh tensors of the call's shape, dtype and layout: the call's own may be under autograd.
    xs = torch.randn(x.shape, dtype=x.dtype, device="cpu").contiguous(
        memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)
    ws = torch.randn(weight.shape, dtype=weight.dtype, device="cpu")
    go = torch.randn_like(xs) if pass_ != "forward" else None

    def candidate(call) -> Candidate:  # (its probe: the call on the batch's first k images)
        return Candidate(lambda: call(xs, go), lambda k: call(xs[:k], None if go is None else go[:k]), xs.shape[0])

    if pass_ == "forward":
        torch_backend = BACKENDS["torch"]
        runs = {"cpu": candidate(lambda x, _: BACKENDS["cpu"].forward(x, ws, None, False))}
        for name, layout in TORCH_TIMINGS.items():
            if layout in torch_backend.cpu_forward_layouts(xs, kw):
                runs[name] = candidate(lambda x, _, layout=layout: torch_backend.forward_in(layout, x, ws, None, False))
        return runs
    return {name: candidate(lambda x, g, b=BACKENDS[name]: b.weight_grad(g, x, kh, kw)) for name in CANDIDATES}


def _is_channels_last(x: torch.Tensor) -> bool:
    return output_memory_format(x) == torch.channels_last


_ONEDNN_CHECKS = {torch.float16: "_is_mkldnn_fp16_supported", torch.bfloat16: "_is_mkldnn_bf16_supported"}


@functools.lru_cache(maxsize=None)
def torch_uses_onednn(dtype: torch.dtype) -> bool:
    """Whether PyTorch's CPU convolution in the half dtype ``dtype`` runs through oneDNN on this CPU:
    PyTorch's own check (``torch.ops.mkldnn._is_mkldnn_fp16_supported``, ``..._bf16_...``: AVX512-FP16
    or AMX-FP16 for fp16, AVX-512 for bf16). Where it says no, PyTorch falls back to its generic
    convolution (no oneDNN call, by ONEDNN_VERBOSE), which ran 7-100x slower than lkfast's kernel
    at ConvNeXt-T's and RepLKNet-31B's layer shapes, batch 8, on an AVX2-only EPYC (Zen 3;
    benchmarks/results/depthwise_cpu_zen3_*) and was ahead only at toy sizes (one channel, an 8x8
    map: by ~50 us). True for other dtypes, and where PyTorch cannot say."""
    check = _ONEDNN_CHECKS.get(dtype)
    try:
        return True if check is None else bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without the check: keep the rule for oneDNN's paths
        return True


def _builtin(dtype: torch.dtype, pass_: str) -> Choice:
    if pass_ == "weight_grad" or dtype in OWN_FORWARD_DTYPES:
        return Choice("cpu", "built-in rule (no measurement for this case): lkfast's kernel")
    if not torch_uses_onednn(dtype):
        return Choice("cpu", f"built-in rule (no measurement for this case): lkfast's kernel, PyTorch having no "
                             f"oneDNN path for {dtype_name(dtype)} on this CPU (only its generic convolution)")
    return Choice("torch", f"built-in rule (no measurement for this case): oneDNN for the {dtype_name(dtype)} "
                           f"forward (PyTorch runs {dtype_name(dtype)} through oneDNN on this CPU)")


def _calibrated(key: tuple, candidates: tuple, make_runs: Callable[[], dict], measure_fn: Optional[Callable]) -> Choice:
    """The calibration's entry for ``key``, measured first (the callables of ``make_runs()``, one per
    candidate, the fastest wins) and saved when the calibration has none."""
    cal = calibration()
    entry = cal.get(key)
    if entry is None:
        # The timing tensors are random: draw them without advancing the caller's generator, so
        # drop-path, dropout and augmentation draws do not depend on whether the cache file existed
        # (a run resumed from a checkpoint must draw what the uninterrupted run drew).
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast("cpu", enabled=False):
            times = (measure_fn or measure)(make_runs())
        seconds = {n: float(t) for n, t in times.items()}
        winner = min(seconds, key=seconds.get)
        entry = {"backend": "torch" if winner in TORCH_TIMINGS else winner, "seconds": seconds,
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        bounded = dict(getattr(times, "bounded", {}))
        if bounded:  # their seconds are a probe's, {name: images}: at least that for the whole call
            entry["bounded"] = bounded
        torch_times = {layout: seconds[n] for n, layout in TORCH_TIMINGS.items() if n in seconds}
        if "nchw" in torch_times:  # PyTorch's forward ran in both layouts (or NCHW only): the faster
            entry["torch_layout"] = _faster_layout(torch_times, {TORCH_TIMINGS[n]: k for n, k in bounded.items()
                                                                 if n in TORCH_TIMINGS})
        assert entry["backend"] in candidates, (entry, candidates)
        cal.put(key, entry)
    bounded = entry.get("bounded", {})
    ms = ", ".join(f"{n} over {t * 1e3:.2f} ms (its first {bounded[n]} image(s) alone)" if n in bounded
                   else f"{n} {t * 1e3:.2f} ms" for n, t in entry["seconds"].items())
    if entry["backend"] == "torch" and "torch_layout" in entry:
        ms += f": torch in {'NCHW' if entry['torch_layout'] == 'nchw' else 'channels_last'}"
    return Choice(entry["backend"], f"calibrated on this machine ({ms}; {cal.path})")


def _faster_layout(torch_times: dict, bounded: dict) -> str:
    """The layout of PyTorch's faster forward timing. Where some timings are lower bounds ({layout:
    k}: the call on the first k images alone, ``Candidate``), they compare only with timings on as
    many images; a whole call's timing wins if it took no longer than every other; otherwise which
    is faster is not known, and it is "channels_last" (the layout without calibration)."""
    faster = min(torch_times, key=torch_times.get)
    if not bounded or (len(bounded) == len(torch_times) and len(set(bounded.values())) == 1):
        return faster  # all whole calls, or all on the same first images: comparable
    whole = [layout for layout in torch_times if layout not in bounded]
    if whole and all(torch_times[whole[0]] <= t for t in torch_times.values()):
        return whole[0]
    return "channels_last"


def choose(x: torch.Tensor, weight: torch.Tensor, pass_: str, *, calibrate: Optional[bool] = None,
           measure_fn: Callable = None) -> Choice:
    """The faster of lkfast's kernel ("cpu") and PyTorch ("torch") for one pass ("forward",
    "input_grad" or "weight_grad") of this call, with where the choice came from.

    ``calibrate`` (default: ``LKFAST_CALIBRATE`` != "0") allows measuring on this machine;
    ``measure_fn(runs) -> {name: seconds}`` replaces the timer (tests use fake timings)."""
    if pass_ not in ("forward", "input_grad", "weight_grad"):
        raise ValueError(f"unknown pass {pass_!r}; expected forward, input_grad or weight_grad")
    measured_pass = "forward" if pass_ == "input_grad" else pass_
    key = shape_class(x.shape, weight.shape[2], weight.shape[3], x.dtype, _is_channels_last(x))
    calibrate = calibration_enabled() if calibrate is None else calibrate
    if calibrate and torch.compiler.is_compiling():
        calibrate = False  # no timing inside a trace: the table decides
    if calibrate:
        return _calibrated((measured_pass,) + key, CANDIDATES, lambda: _runs(x, weight, measured_pass), measure_fn)
    fp_isa = fingerprint()["isa"]
    found = table_lookup(fp_isa, measured_pass, key)
    if found is not None:
        backend, row = found
        return Choice(backend, f"shipped {fp_isa} table, nearest measured row {row}")
    return _builtin(x.dtype, measured_pass)


_torch_layouts: dict = {}  # torch_forward_layout's answers (see remembered)


def torch_forward_layout(x: torch.Tensor, weight: torch.Tensor) -> str:
    """"channels_last" or "nchw": the layout in which PyTorch's convolution runs the forward of this
    CPU input (one that is not channels_last) in the torch backend, the faster of the two in this
    machine's calibration of the call's shape class (measured now when the calibration has no entry
    for it). "channels_last" when calibration is off or ``torch.compile`` traces (the shipped table
    was measured with that copy) and for entries measured without PyTorch's NCHW path."""
    token = memo_token()  # None: calibration off or tracing
    if token is None:
        return "channels_last"
    channels_last = _is_channels_last(x)

    def compute():
        key = ("forward",) + shape_class(x.shape, weight.shape[2], weight.shape[3], x.dtype, channels_last)
        if calibration().get(key) is None:
            choose(x, weight, "forward", calibrate=True)
        entry = calibration().get(key) or {}
        return entry.get("torch_layout", "channels_last")

    args = (tuple(x.shape), x.dtype, channels_last, tuple(weight.shape[2:]))
    return backends.remembered(_torch_layouts, args, token, compute)


POINTWISE_GRADS = ("", "x", "w", "xw")  # which gradients a call's backward computes (none: forward only)


def _pointwise_runs(x: torch.Tensor, weight: torch.Tensor, grads: str = "") -> dict[str, Callable[[], None]]:
    """One call of each candidate on fresh tensors of the call's shapes: the forward, or with
    ``grads`` the forward and the backward computing those gradients ("x": the input's, "w": the
    weight's), as the call will run them."""
    import torch.nn.functional as F

    xs = torch.randn(x.shape, dtype=x.dtype, device="cpu").contiguous(memory_format=torch.channels_last)
    ws = torch.randn(weight.shape, dtype=weight.dtype, device="cpu")
    if not grads:
        w2 = ws.reshape(ws.shape[0], ws.shape[1])
        return {"matmul": lambda: F.linear(xs.permute(0, 2, 3, 1), w2), "conv": lambda: F.conv2d(xs, ws)}
    xs.requires_grad_("x" in grads)
    ws.requires_grad_("w" in grads)
    leaves = [t for t in (xs, ws) if t.requires_grad]
    g = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:], dtype=x.dtype).contiguous(
        memory_format=torch.channels_last)

    def matmul():
        with torch.enable_grad():  # (the measurement runs under no_grad)
            out = F.linear(xs.permute(0, 2, 3, 1), ws.reshape(ws.shape[0], ws.shape[1]))
            torch.autograd.grad(out, leaves, g.permute(0, 2, 3, 1))

    def conv():
        with torch.enable_grad():
            torch.autograd.grad(F.conv2d(xs, ws), leaves, g)

    return {"matmul": matmul, "conv": conv}


def choose_pointwise(x: torch.Tensor, weight: torch.Tensor, *, calibrate: Optional[bool] = None,
                     measure_fn: Callable = None, uncalibrated: str = "conv", grads: str = "") -> Choice:
    """How ``lkfast.nn.pointwise_conv2d`` computes a 1x1 convolution of this channels_last CPU input:
    "matmul" (``F.linear`` on the NHWC view) or "conv" (``F.conv2d``, oneDNN), whichever this
    machine's calibration measured faster for the shape class (forward, fresh tensors). Which wins
    depends on the CPU's matrix-product library: on the AVX-512 development Xeon the product was
    faster on small maps (oneDNN reorders the weight on every call), on a Zen 4 EPYC it ran at
    0.71-0.91x of oneDNN's convolution (MKL's SGEMM). Without calibration (``LKFAST_CALIBRATE=0``,
    or while ``torch.compile`` traces) the answer is ``uncalibrated``: the caller's own op, "conv"
    for a convolution layer, "matmul" for a linear one (``lkfast.nn.pointwise_linear``).

    ``grads`` ("x", "w" or "xw"; default "": forward only) measures the forward and the backward
    computing those gradients instead, under a key of its own: the two can disagree (capped to
    AVX2 on the Zen 5, oneDNN's 1x1 convolution ran ViT-B's linears 1.1-1.2x faster than MKL
    forward and 0.75-0.79x in a training step)."""
    if uncalibrated not in POINTWISE_CANDIDATES:
        raise ValueError(f"uncalibrated={uncalibrated!r}: expected one of {', '.join(POINTWISE_CANDIDATES)}")
    if grads not in POINTWISE_GRADS:
        raise ValueError(f"grads={grads!r}: expected one of {', '.join(map(repr, POINTWISE_GRADS))}")
    calibrate = calibration_enabled() if calibrate is None else calibrate
    if not calibrate or torch.compiler.is_compiling():
        own = "convolution" if uncalibrated == "conv" else "matrix product (F.linear)"
        return Choice(uncalibrated, f"no calibration: PyTorch's {own}")
    n, c, h, w = (int(s) for s in x.shape)
    key = ("pointwise", dtype_name(x.dtype), _bucket(n), c, int(weight.shape[0]), _bucket(h), _bucket(w))
    if grads:
        key += (f"grad-{grads}",)
    return _calibrated(key, POINTWISE_CANDIDATES, lambda: _pointwise_runs(x, weight, grads), measure_fn)


__all__ = ["choose", "choose_pointwise", "torch_forward_layout", "torch_uses_onednn", "memo_token", "choices_token", "remembered", "cache_path", "Choice", "Calibration", "calibration", "shape_class", "fingerprint", "table_lookup", "table_choices_digest",
           "measure", "cache_dir", "calibration_enabled"]

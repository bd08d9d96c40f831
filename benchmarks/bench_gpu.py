"""GPU benchmark of lkfast's depthwise convolution against plain PyTorch, in the same run.

    python benchmarks/bench_gpu.py --out DIR [--budget SECONDS] [--batch 64] [--quick]
    python benchmarks/bench_gpu.py --dry-run --out DIR            # tiny shapes on the CPU: checks the script
    python benchmarks/bench_gpu.py --out DIR --shapes replknet31b-s2,convnext-k7 --dtypes float32 [--backends cuda] [--no-e2e]
    python benchmarks/bench_gpu.py --write-table DIR/gpu_bench.json [MORE.json ...] [--table-path PATH]
    python benchmarks/bench_gpu.py --plot DIR/gpu_bench.json DIR/gpu_speedup.png

The baseline is plain PyTorch, not lkfast's op layer: ``F.conv2d`` with autograd, on NCHW input
(PyTorch's own depthwise kernel) and on channels_last input (cuDNN), with
``torch.backends.cudnn.benchmark = True``. Every time comes from ``lkfast.timing.gpu_time_ms``:
CUDA events around many back-to-back calls after untimed warm-up calls (Triton autotuning and
cuDNN's algorithm search happen there and are not counted).

Shapes: the four RepLKNet-31B stages at 224 px (56/28/14/7 px maps, k = 31/29/27/13), ConvNeXt's
k = 7 and SLaK's 51x5, batch 64; fp16, bf16, fp32; NCHW and channels_last. ``--quick``: the k = 31
stage-1 and the k = 27 stage-3 shapes in fp16, backends cuda and triton_mma (on the H200 that took
~125 s, cuDNN's algorithm search for the stage-1 channels_last input gradient alone 34 s: bf16,
whose lkfast times were within 7% of fp16's there, is left to the full run).
``--shapes/--dtypes/--backends`` pick other cases.

1. Per pass (forward, input gradient, weight gradient), each lkfast backend (cuda, triton, and
   triton_mma, the tensor-core kernels, in fp16/bf16; in fp32 its rows say why not) against
   PyTorch's own kernel for that pass (``F.conv2d`` forward; ``aten.convolution_backward`` with one
   output selected, the call autograd makes) in the same layout. The fastest per pass makes a row of
   the ``auto`` table (key: GPU name, dtype, layout, kh, kw, N, C, H, W): "torch" wherever PyTorch won.
2. End to end with that table installed (``LKFAST_CUDA_TABLE``): forward, forward + input grad,
   forward + both grads through ``lkfast.ops.depthwise_conv2d`` (``auto`` and each backend) against
   plain ``F.conv2d`` + autograd in both layouts; TFLOP/s count the multiply-adds that do not touch
   padding, GB/s the minimal traffic (inputs read and outputs written once per pass).
Writes DIR/gpu_bench.json and DIR/gpu_bench.md. Cases run most important first and are skipped
(and marked so) once --budget seconds are spent, so a time-boxed run still leaves results.
``--write-table`` ships the measured table with ``lkfast.ops.cuda_table.save_table``; given several
results files it merges their tables (a key measured twice takes the later file's row).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from lkfast.bench import valid_taps
from lkfast.tables import markdown_table, write_text_atomic
from lkfast.timing import time_ms

SHAPES = [  # (name, C, H, W, kh, kw)
    ("replknet31b-s1", 128, 56, 56, 31, 31),
    ("replknet31b-s2", 256, 28, 28, 29, 29),
    ("replknet31b-s3", 512, 14, 14, 27, 27),
    ("replknet31b-s4", 1024, 7, 7, 13, 13),
    ("convnext-k7", 96, 56, 56, 7, 7),
    ("slak-51x5", 128, 56, 56, 51, 5),
]
QUICK_SHAPES = ("replknet31b-s1", "replknet31b-s3")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUICK_DTYPES = ("float16",)
LAYOUTS = ("channels_last", "nchw")
LKFAST_BACKENDS = ("cuda", "triton", "triton_mma")  # triton_mma: tensor cores, fp16/bf16 only
# --quick leaves out the CUDA-core Triton kernels: on the H200 (2026-12-04, gpu_h200/) they took 3x the
# CUDA kernels' time at stage 1, and their autotuning would spend the quick call's minutes
QUICK_BACKENDS = ("cuda", "triton_mma")
PASSES = ("forward", "input_grad", "weight_grad")
MODES = {"forward": 1, "forward+input_grad": 2, "forward+both_grads": 3}  # conv passes per mode
BASELINES = ("torch-nchw", "torch-channels_last")  # plain F.conv2d + autograd in each layout
# --dry-run: the whole script on tiny shapes on the CPU (wall-clock times), to check it end to end
# on a machine without a GPU before spending GPU time on it.
DRY_RUN_SHAPES = [("tiny-k7", 8, 12, 12, 7, 7)]
DRY_RUN_BACKENDS = ("cpu",)
DRY_RUN_NAME = "CPU dry run"
OWN_BACKENDS = LKFAST_BACKENDS + DRY_RUN_BACKENDS  # the columns of the end-to-end table

# Peaks (FLOP/s, bytes/s) by device name; fp16/bf16 CUDA-core peak is twice fp32 (packed half2).
PEAKS = {
    "H200": {"float32": 67e12, "half": 134e12, "tensor": 990e12, "bw": 4.8e12},
    "H100": {"float32": 67e12, "half": 134e12, "tensor": 990e12, "bw": 3.35e12},
    "A100": {"float32": 19.5e12, "half": 78e12, "tensor": 312e12, "bw": 2.0e12},
}


def peaks_for(name: str) -> dict | None:
    return next((value for key, value in PEAKS.items() if key in name), None)


class Run:
    """Where and how this run measures: device, the lkfast backends to compare, the deadline."""

    def __init__(self, device: str, backends: tuple, budget: float, pass_share: float = 0.55):
        self.device, self.backends = device, backends
        self.start = time.time()
        self.deadline = self.start + budget
        self.pass_deadline = self.start + pass_share * budget  # part 1 leaves time for part 2

    def time_ms(self, fn) -> float:
        return time_ms(fn, self.device, rounds=3)


def make_inputs(shape, dtype, layout, batch, device):
    """Seeded random x, w, grad_out, drawn on ``device`` itself: stage 1 at batch 64 is 2 x 25.7M
    values, a quarter of a second each on the CPU, and the inputs are made again for every case."""
    _, C, H, W, kh, kw = shape
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    x = randn(batch, C, H, W).to(dtype).contiguous(memory_format=fmt)
    w = (randn(C, 1, kh, kw) / (kh * kw) ** 0.5).to(dtype)
    g = randn(batch, C, H, W).to(dtype).contiguous(memory_format=fmt)
    return x, w, g


def torch_pass(name: str, x, w, g):
    """PyTorch's own kernel for one pass, as autograd calls it (no lkfast code on this path)."""
    kh, kw = w.shape[-2:]
    padding = [kh // 2, kw // 2]
    if name == "forward":
        return lambda: F.conv2d(x, w, None, 1, padding, 1, x.shape[1])
    mask = [name == "input_grad", name == "weight_grad", False]
    return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], padding, [1, 1], False, [0, 0],
                                                       x.shape[1], mask)


def lkfast_pass(name: str, backend: str, x, w, g):
    from lkfast.ops.backends import BACKENDS

    impl = BACKENDS[backend]
    kh, kw = w.shape[-2:]
    return {"forward": lambda: impl.forward(x, w, None, False),
            "input_grad": lambda: impl.forward(g, w, None, True),
            "weight_grad": lambda: impl.weight_grad(g, x, kh, kw)}[name]


def _row(kind, shape, dtype, layout, batch, **extra) -> dict:
    _, C, H, W, kh, kw = shape
    return dict(kind=kind, shape=shape[0], C=C, H=H, W=W, kh=kh, kw=kw, dtype=dtype, layout=layout, batch=batch, **extra)


def _measure(row: dict, fn, run: Run, deadline: float) -> dict:
    if time.time() > deadline:
        row["error"] = "skipped: time budget spent"
        return row
    try:
        row["ms"] = run.time_ms(fn)
    except Exception as exc:  # a failing backend is a result, not the end of the run
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


# A backend whose result is this far from PyTorch's (max |difference| / max |PyTorch's|, in fp32) is
# wrong, not rounded differently: its row gets no time, so it can never enter the auto table. fp16 /
# bf16 rounding stays below ~1e-2 (tests/reference.py's tolerances); a kernel bug gives O(1).
WRONG_RESULT = 0.1


def torch_result(name: str, x, w, g):
    """PyTorch's result of one pass (the tensor lkfast's backends return for it)."""
    out = torch_pass(name, x, w, g)()
    return out if name == "forward" else out[0 if name == "input_grad" else 1]


def _error_vs(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def per_pass(shape, dtype, layout, batch, run: Run, rows: list) -> None:
    from lkfast.ops.backends import BACKENDS

    x, w, g = make_inputs(shape, DTYPES[dtype], layout, batch, run.device)
    expected = {}
    for backend in ("torch",) + run.backends:  # PyTorch first: a pass without its time makes no table row
        why = [] if backend == "torch" else BACKENDS[backend].not_supported_reasons(x, w)
        for name in PASSES:
            row = _row("pass", shape, dtype, layout, batch, backend=backend, op=name)
            if why:
                row["error"] = "; ".join(why)
                rows.append(row)
                continue
            fn = torch_pass(name, x, w, g) if backend == "torch" else lkfast_pass(name, backend, x, w, g)
            began = time.time()
            if backend != "torch" and time.time() <= run.pass_deadline:
                # The result once, against PyTorch's, before it is timed (on a GPU this first call
                # also autotunes: the configuration the timing uses is the one checked)
                try:
                    if name not in expected:
                        expected[name] = torch_result(name, x, w, g)
                    row["rel_err_vs_torch"] = _error_vs(fn(), expected[name])
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    rows.append(row)
                    continue
                if not row["rel_err_vs_torch"] <= WRONG_RESULT:
                    row["error"] = f"wrong result: max error {row['rel_err_vs_torch']:.2g} of PyTorch's largest value"
                    rows.append(row)
                    continue
            rows.append(_measure(row, fn, run, run.pass_deadline))
            row["wall_s"] = round(time.time() - began, 2)  # check, warm-up (autotuning, cuDNN's search) and timing


def derive_table(rows: list, gpu: str) -> dict:
    """{(gpu, dtype, layout, kh, kw, N, C, H, W): (forward, input_grad, weight_grad)}: per pass the
    backend with the lowest time among those measured there, "torch" (PyTorch) where it won or
    where nothing of lkfast's ran. Keys with no PyTorch time for a pass are left out: a row must
    never name a backend that was not compared with PyTorch."""
    best: dict = {}
    for r in rows:
        if r.get("kind") != "pass" or "ms" not in r:
            continue
        key = (gpu, r["dtype"], r["layout"], r["kh"], r["kw"], r["batch"], r["C"], r["H"], r["W"])
        best.setdefault(key, {}).setdefault(r["op"], {})[r["backend"]] = r["ms"]
    table = {}
    for key, by_pass in best.items():
        if not all("torch" in by_pass.get(p, {}) for p in PASSES):
            continue
        table[key] = tuple(min(by_pass[p], key=by_pass[p].get) for p in PASSES)
    return table


def end_to_end(shape, dtype, layout, batch, run: Run, rows: list, baselines: dict) -> None:
    import lkfast.ops as ops

    for mode in MODES:
        names = ["auto", *run.backends, *BASELINES]
        for name in names:
            row = _row("e2e", shape, dtype, layout, batch, backend=name, mode=mode)
            memo = (shape[0], dtype, mode, name)
            if name in BASELINES and memo in baselines:  # the plain baseline does not depend on the row's layout
                rows.append(dict(row, **{k: v for k, v in baselines[memo].items() if k in ("ms", "error")}))
                continue
            in_layout = name.split("-", 1)[1] if name in BASELINES else layout
            x, w, g = make_inputs(shape, DTYPES[dtype], "nchw" if in_layout == "nchw" else "channels_last", batch,
                                  run.device)
            x.requires_grad_(mode != "forward")
            w.requires_grad_(mode == "forward+both_grads")
            if name in BASELINES:
                kh, kw = w.shape[-2:]
                conv = lambda t, k: F.conv2d(t, k, None, 1, (kh // 2, kw // 2), 1, t.shape[1])  # noqa: E731
            else:
                conv = lambda t, k, backend=name: ops.depthwise_conv2d(t, k, backend=backend)  # noqa: E731
                if name == "auto":
                    try:
                        row["plan"] = ",".join(ops.plan_for(x, w))
                    except Exception as exc:
                        row["plan"] = f"{type(exc).__name__}: {exc}"[:200]

            def step(conv=conv, x=x, w=w, g=g, mode=mode):
                if mode == "forward":
                    with torch.no_grad():
                        conv(x, w)
                else:
                    inputs = [x, w] if mode == "forward+both_grads" else [x]
                    torch.autograd.grad(conv(x, w), inputs, g)

            began = time.time()
            rows.append(_measure(row, step, run, run.deadline))
            row["wall_s"] = round(time.time() - began, 2)
            if name in BASELINES:
                baselines[memo] = row


def add_rates(rows: list, device_name: str) -> None:
    """TFLOP/s of the multiply-adds that touch no padding, and GB/s of the minimal traffic."""
    peaks = peaks_for(device_name)
    for r in rows:
        if "ms" not in r:
            continue
        passes = MODES.get(r.get("mode"), 1)
        elems = r["batch"] * r["C"] * r["H"] * r["W"]
        elem_bytes = torch.empty(0, dtype=DTYPES[r["dtype"]]).element_size()
        flops = 2.0 * r["batch"] * r["C"] * valid_taps(r["H"], r["kh"]) * valid_taps(r["W"], r["kw"]) * passes
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        r["gbps"] = 2.0 * elems * elem_bytes * passes / (r["ms"] * 1e-3) / 1e9
        if peaks:
            r["pct_cuda_core_peak"] = 100 * r["tflops"] * 1e12 / peaks["float32" if r["dtype"] == "float32" else "half"]
            r["pct_bw_peak"] = 100 * r["gbps"] * 1e9 / peaks["bw"]


def _ms(r) -> str | None:
    if not r:
        return None
    return f"{r['ms']:.3f}" if "ms" in r else "err"


def speedup(group: dict) -> float | None:
    """PyTorch's faster layout over lkfast ``auto``: ``group`` maps backend names ("auto" and the
    BASELINES) to ms for one (shape, dtype, layout, mode); None without auto or any baseline."""
    plain = [group[b] for b in BASELINES if group.get(b) is not None]
    return min(plain) / group["auto"] if plain and group.get("auto") else None


def markdown(rows: list, device_name: str, batch: int) -> str:
    """Both tables (end to end, then per pass) and the errors, through lkfast.tables."""
    groups: dict = {}
    for r in rows:
        if r["kind"] == "e2e":
            groups.setdefault((r["shape"], r["dtype"], r["layout"], r["mode"]), {})[r["backend"]] = r
    e2e = []
    for (shape, dtype, layout, mode), g in groups.items():
        auto = g.get("auto")
        ratio = speedup({b: r.get("ms") for b, r in g.items()})
        ratio = f"{ratio:.2f}x" if ratio is not None else None
        rate = lambda key: f"{auto[key]:.1f}" if auto and key in auto else None  # noqa: E731
        e2e.append([shape, dtype, layout, mode, _ms(auto), auto.get("plan") if auto else None,
                    *(_ms(g.get(b)) for b in OWN_BACKENDS if any(b in v for v in groups.values())),
                    *(_ms(g.get(b)) for b in BASELINES), ratio, rate("tflops"), rate("gbps")])
    own = [b for b in OWN_BACKENDS if any(b in v for v in groups.values())]
    header = ["shape", "dtype", "layout", "mode", "auto ms", "auto plan", *(f"{b} ms" for b in own),
              "PyTorch NCHW ms", "PyTorch channels_last (cuDNN) ms", "auto speed-up", "auto TFLOP/s", "auto GB/s"]
    how = ("median wall-clock rounds on the CPU (a dry run: checks the script, measures nothing)" if device_name == DRY_RUN_NAME
           else "cudnn.benchmark on; ms per call from CUDA events around back-to-back calls")
    caption = (f"## End to end, {device_name}, batch {batch}: lkfast through lkfast.ops.depthwise_conv2d against "
               f"plain F.conv2d + autograd; {how}; speed-up = PyTorch's faster layout / auto; TFLOP/s count "
               f"non-padding multiply-adds")
    parts = [f"# lkfast GPU benchmark ({device_name})\n", markdown_table(header, e2e, caption=caption)]

    passes: dict = {}
    for r in rows:
        if r["kind"] == "pass":
            passes.setdefault((r["shape"], r["dtype"], r["layout"], r["op"]), {})[r["backend"]] = r
    backends = sorted({r["backend"] for r in rows if r["kind"] == "pass"} - {"torch"}) + ["torch"]
    per_pass_rows = []
    for (shape, dtype, layout, op), g in passes.items():
        timed = {b: g[b]["ms"] for b in g if "ms" in g[b]}
        winner = min(timed, key=timed.get) if "torch" in timed else None
        per_pass_rows.append([shape, dtype, layout, op, *(_ms(g.get(b)) for b in backends), winner])
    parts.append(markdown_table(["shape", "dtype", "layout", "pass", *(f"{b} ms" for b in backends), "table entry"],
                                per_pass_rows, caption="## Per pass (PyTorch: its own kernel for the pass, same layout)"))
    errors = sorted({f"{r['backend']}: {r['error']}" for r in rows if "error" in r})
    if errors:
        parts.append("## Errors and skips\n\n" + "\n".join(f"- {e}" for e in errors[:40]) + "\n")
    return "\n".join(parts)


def _load_results(path: str, purpose: str, needs: tuple) -> dict:
    """A gpu_bench.json written by a GPU run, or SystemExit saying what is wrong with ``path`` (missing,
    not JSON, not a bench_gpu.py results file, a --dry-run's); ``needs``: the keys the caller reads."""
    what = "a gpu_bench.json that python benchmarks/bench_gpu.py --out DIR writes"
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"bench_gpu: {path} does not exist; give {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"bench_gpu: {path} is not JSON ({error}); give {what}") from None
    missing = [key for key in needs if key not in data] if isinstance(data, dict) else list(needs)
    if missing:
        raise SystemExit(f"bench_gpu: {path} is not {what} (it has no {', '.join(map(repr, missing))})")
    if data.get("dry_run"):
        raise SystemExit(f"{path} comes from a --dry-run on the CPU: it measured nothing to {purpose}")
    return data


def write_table(results_paths: list, table_path: str | None = None) -> str:
    """Ship the table of one or more gpu_bench.json files through cuda_table.save_table (merged in
    order: a later file's row replaces an earlier one's for the same key); returns the path written."""
    from lkfast.ops import cuda_table

    rows: dict = {}
    runs: list = []
    for results_path in results_paths:
        data = _load_results(results_path, "ship", ("table", "measured_on"))
        rows.update((tuple(k), tuple(v)) for k, v in data["table"])
        if data["measured_on"] not in runs:
            runs.append(data["measured_on"])
    measured_on = "; ".join(runs)
    path = cuda_table.save_table(rows, measured_on, table_path)
    print(f"wrote {len(rows)} rows measured on {measured_on} to {path}")
    return str(path)


def plot(results_path: str, png_path: str) -> str:
    """The end-to-end speed-ups of a gpu_bench.json as a figure: one panel per mode, a bar per
    (shape, layout, dtype), lkfast ``auto`` against PyTorch's faster layout; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _load_results(results_path, "plot", ("rows", "device", "batch"))
    groups: dict = {}
    for r in data["rows"]:
        if r["kind"] == "e2e" and "ms" in r:
            groups.setdefault((r["shape"], r["layout"], r["dtype"], r["mode"]), {})[r["backend"]] = r["ms"]
    cases = sorted({k[:3] for k in groups}, key=lambda c: ([s[0] for s in SHAPES].index(c[0]), c[1], c[2]))
    if not cases:
        raise SystemExit(f"{results_path} holds no end-to-end timings to plot")
    colors = {"float16": "tab:blue", "bfloat16": "tab:orange", "float32": "tab:green"}
    fig, axes = plt.subplots(1, len(MODES), figsize=(4.4 * len(MODES), 3.9), sharey=True)
    for ax, mode in zip(axes, MODES):
        ratios = [speedup(groups.get((*case, mode), {})) or 0.0 for case in cases]
        bars = ax.bar(range(len(cases)), ratios, color=[colors[c[2]] for c in cases])
        ax.bar_label(bars, fmt="%.1f×", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)), [f"{c[0].replace('replknet31b-', '')}\n{'CL' if c[1] == 'channels_last' else 'NCHW'}"
                                          for c in cases], fontsize=7)
        ax.set_title(mode.replace("+", " + ").replace("_", " "), fontsize=9)
    axes[0].set_ylabel("speed-up of lkfast auto vs PyTorch's faster layout")
    from matplotlib.patches import Patch

    shown = sorted({c[2] for c in cases}, key=list(DTYPES).index)
    axes[0].legend(handles=[Patch(color=colors[d], label=d) for d in shown], fontsize=7, loc="upper left")
    sizes = {s[0]: f"{s[0].replace('replknet31b-', 'RepLKNet-31B ')}: C={s[1]}, {s[2]}², k={s[4]}x{s[5]}" for s in SHAPES}
    fig.suptitle(f"Depthwise conv on {data['device']}, batch {data['batch']} ("
                 + "; ".join(dict.fromkeys(sizes[c[0]] for c in cases)) + "); dashed = PyTorch (cuDNN benchmark on)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _pick(option: str, given: str | None, known, default) -> list:
    """The comma-separated names of --shapes/--dtypes/--backends, checked against the known ones."""
    if given is None:
        return list(default)
    names = [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"bench_gpu: {option}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", type=float, default=360.0, help="seconds; later cases are skipped")
    parser.add_argument("--quick", action="store_true", help="k=31 stage 1 and stage 3, fp16, backends cuda and triton_mma")
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(s[0] for s in SHAPES)}")
    parser.add_argument("--dtypes", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--backends", help=f"comma-separated lkfast backends, of {', '.join(LKFAST_BACKENDS)}")
    parser.add_argument("--no-e2e", action="store_true", help="per pass only (the table), all of --budget for it")
    parser.add_argument("--write-table", metavar="JSON", nargs="+",
                        help="ship the table of gpu_bench.json files (cuda_table.save_table; merged in order)")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="the end-to-end speed-ups of a gpu_bench.json as a figure")
    parser.add_argument("--table-path", help="with --write-table: write here instead of the package's cuda_table.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.write_table and args.plot:
        parser.error("--write-table and --plot are separate runs: give one of them")
    if args.write_table:
        write_table(args.write_table, args.table_path)
        return 0
    if args.plot:
        print("wrote", plot(*args.plot))
        return 0
    if not args.out:
        parser.error("--out DIR is required to measure")
    if args.dry_run:
        chosen = [o for o, v in (("--shapes", args.shapes), ("--dtypes", args.dtypes), ("--backends", args.backends),
                                 ("--quick", args.quick)) if v]
        if chosen:
            parser.error(f"--dry-run times its own tiny CPU case; {', '.join(chosen)} apply to GPU runs")
        run = Run("cpu", DRY_RUN_BACKENDS, args.budget)
        shapes, dtypes, batch, device_name = DRY_RUN_SHAPES, ["float32"], 2, DRY_RUN_NAME
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure (--dry-run checks the script on the CPU)")
        return 2
    else:
        torch.backends.cudnn.benchmark = True
        backends = _pick("--backends", args.backends, LKFAST_BACKENDS, QUICK_BACKENDS if args.quick else LKFAST_BACKENDS)
        run = Run("cuda", tuple(backends), args.budget, pass_share=1.0 if args.no_e2e else 0.55)
        names = _pick("--shapes", args.shapes, [s[0] for s in SHAPES], QUICK_SHAPES if args.quick else [s[0] for s in SHAPES])
        shapes = [s for name in names for s in SHAPES if s[0] == name]
        dtypes = _pick("--dtypes", args.dtypes, list(DTYPES), QUICK_DTYPES if args.quick else DTYPES)
        batch, device_name = args.batch, torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    measured_on = f"{device_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    rows: list[dict] = []
    table: dict = {}

    def save() -> None:  # after every group: a run killed from outside still leaves what it measured
        add_rates(rows, device_name)
        result = {"device": device_name, "measured_on": measured_on, "torch": torch.__version__, "batch": batch,
                  "dry_run": args.dry_run, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                  "timer": "lkfast.timing.gpu_time_ms" if run.device == "cuda" else "lkfast.timing.time_interleaved",
                  "seconds": round(time.time() - run.start, 1), "peaks": peaks_for(device_name), "rows": rows,
                  "table": [[list(k), list(v)] for k, v in sorted(table.items())]}
        write_text_atomic(os.path.join(args.out, "gpu_bench.json"), json.dumps(result, indent=1))
        write_text_atomic(os.path.join(args.out, "gpu_bench.md"), markdown(rows, device_name, batch))

    # 1. per pass -> the auto table; dtype-major, fp16 first: a cut-off run keeps what the targets are about
    for dtype in dtypes:
        for shape in shapes:
            for layout in LAYOUTS:
                per_pass(shape, dtype, layout, batch, run, rows)
            table = derive_table(rows, device_name)
            save()
    # 2. end to end with that table installed (read per call from LKFAST_CUDA_TABLE)
    from lkfast.ops import cuda_table

    with tempfile.TemporaryDirectory() as tmp:
        previous = os.environ.get(cuda_table.ENV_VAR)
        if run.device == "cuda":  # auto on the CPU (--dry-run) does not read this table
            os.environ[cuda_table.ENV_VAR] = str(cuda_table.save_table(table, measured_on, os.path.join(tmp, "t.json")))
        baselines: dict = {}
        try:
            for dtype in dtypes if not args.no_e2e else ():
                for shape in shapes:
                    for layout in LAYOUTS:
                        end_to_end(shape, dtype, layout, batch, run, rows, baselines)
                    save()
        finally:
            os.environ.pop(cuda_table.ENV_VAR, None)
            if previous is not None:
                os.environ[cuda_table.ENV_VAR] = previous
    print(markdown(rows, device_name, batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())

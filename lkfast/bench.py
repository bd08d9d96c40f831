"""Depthwise-convolution benchmark on this machine: lkfast against PyTorch's own op, same run.

    python -m lkfast.bench            # the four RepLKNet-31B stage shapes, batch 8
    python -m lkfast.bench --shapes convnext   # ConvNeXt-T's four stages, 7x7 kernels
    python -m lkfast.bench --quick    # fewer repetitions, batch 2
    python -m lkfast.bench --json out.json

The cases are shared with the pytest-benchmark suite in benchmarks/bench_depthwise.py, which is
what the README's figures come from; both time with lkfast.timing.time_interleaved and write the
table through lkfast.tables. Speed-ups are against the faster of PyTorch's two layouts (NCHW, what
users get by default, and channels_last, oneDNN's fast path on the CPU), timed in turn with lkfast
in the same rounds; GFLOP/s counts only the multiply-adds that do not touch padding.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lkfast.tables import check_writable, markdown_table, write_text_atomic
from lkfast.timing import median, time_interleaved

# RepLKNet-31B at 224 px: (channels, map size, kernel) of the four stages.
STAGE_SHAPES = [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13)]
# ConvNeXt-T at 224 px, its 7x7 depthwise kernels.
CONVNEXT_SHAPES = [(96, 56, 7), (192, 28, 7), (384, 14, 7), (768, 7, 7)]
SHAPE_SETS = {"replknet": STAGE_SHAPES, "convnext": CONVNEXT_SHAPES}
SHAPE_SET_TITLES = {"replknet": "RepLKNet-31B stage shapes", "convnext": "ConvNeXt-T stage shapes, 7x7"}


def shapes_named(name: str) -> list:
    """SHAPE_SETS[name], or a ValueError that lists the names there are."""
    if name not in SHAPE_SETS:
        raise ValueError(f"unknown shape set {name!r}; choose one of {', '.join(SHAPE_SETS)}")
    return SHAPE_SETS[name]


def shape_set_of(shapes) -> str:
    """The name of the SHAPE_SETS entry holding every (channels, size, kernel) in ``shapes``."""
    shapes = {tuple(s) for s in shapes}
    for name, members in SHAPE_SETS.items():
        if shapes <= set(members):
            return name
    raise ValueError(f"shapes {sorted(shapes)} are not one of the sets {', '.join(SHAPE_SETS)}")
# What each benchmark row times: its label (kept in the JSON results) and the op's passes it runs.
PASS_SETS = {
    "forward": ("forward",),
    "forward+input_grad": ("forward", "input_grad"),
    "forward+input_grad+weight_grad": ("forward", "input_grad", "weight_grad"),
}
PASSES = tuple(PASS_SETS)
IMPLEMENTATIONS = ("pytorch_nchw", "pytorch_channels_last", "lkfast_auto", "lkfast_cpu")


def valid_taps(size: int, k: int) -> int:
    """Sum over output positions of the taps that land inside a 1-D signal of `size` (zero padding k//2)."""
    p = k // 2
    return sum(min(i + p, size - 1) - max(i - p, 0) + 1 for i in range(size))


def effective_flop(batch: int, channels: int, h: int, w: int, kh: int, kw: int, passes: str) -> float:
    """2 * multiply-adds that touch no padding, times the number of convolution-sized passes."""
    per_pass = 2.0 * batch * channels * valid_taps(h, kh) * valid_taps(w, kw)
    return per_pass * len(PASS_SETS[passes])


@dataclass
class Case:
    name: str
    impl: str
    passes: str
    shape: tuple  # (N, C, H, W, kh, kw)
    run: Callable[[], None]
    flop: float


INPUT_LAYOUTS = ("channels_last", "nchw")  # the layout lkfast's implementations are handed


def make_case(impl: str, passes: str, batch: int, channels: int, size: int, k: int,
              dtype=torch.float32, device="cpu", input_layout: str = "channels_last") -> Case:
    """One timed case. PyTorch's implementations run on their own layout's tensors (no copy timed);
    lkfast's on ``input_layout`` ("channels_last", or "nchw": what an NCHW model hands the op, whose
    fair baseline is PyTorch's NCHW column)."""
    if input_layout not in INPUT_LAYOUTS:
        raise ValueError(f"unknown input layout {input_layout!r}; choose one of {', '.join(INPUT_LAYOUTS)}")
    from lkfast.ops import depthwise_conv2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(channels, 1, k, k, generator=gen) / k).to(device=device, dtype=dtype)
    b = torch.zeros(channels, device=device, dtype=dtype)
    if impl == "pytorch_nchw":
        x = x.contiguous()
        conv = lambda t, wt: F.conv2d(t, wt, b, padding=k // 2, groups=channels)  # noqa: E731
    elif impl == "pytorch_channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        conv = lambda t, wt: F.conv2d(t, wt, b, padding=k // 2, groups=channels)  # noqa: E731
    elif impl.startswith("lkfast_"):
        backend = impl[len("lkfast_"):]
        x = x.contiguous(memory_format=torch.channels_last if input_layout == "channels_last" else torch.contiguous_format)
        conv = lambda t, wt: depthwise_conv2d(t, wt, b, backend=backend)  # noqa: E731
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    grad_out = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)

    if passes == "forward":
        def run():
            with torch.no_grad():
                conv(x, w)
    elif passes == "forward+input_grad":
        xg = x.detach().requires_grad_(True)

        def run():
            torch.autograd.grad(conv(xg, w), xg, grad_out)
    elif passes == "forward+input_grad+weight_grad":
        xg = x.detach().requires_grad_(True)
        wg = w.detach().requires_grad_(True)

        def run():
            torch.autograd.grad(conv(xg, wg), (xg, wg), grad_out)
    else:
        raise ValueError(f"unknown passes {passes!r}; choose one of {', '.join(PASSES)}")
    name = f"{impl}-{passes}-C{channels}-H{size}-k{k}"
    return Case(name, impl, passes, (batch, channels, size, size, k, k), run,
                effective_flop(batch, channels, size, size, k, k, passes))


_ONEDNN_PROBE = r"""
import torch, torch.nn.functional as F
x = torch.randn(1, 64, 16, 16).contiguous(memory_format=torch.channels_last)
F.conv2d(x, torch.randn(64, 1, 7, 7), padding=3, groups=64)
"""


def onednn_depthwise_implementation(env: dict | None = None) -> str:
    """The kernel oneDNN runs for a channels_last depthwise conv under ``env`` (default: this
    process's environment, so ONEDNN_MAX_CPU_ISA applies), e.g. 'brdgmm_dw:avx2', read from its
    verbose log in a child process (oneDNN reads its settings once per process)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ if env is None else env, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout
    impls = [line.split(",")[6] for line in out.splitlines()
             if line.startswith("onednn_verbose") and ",exec," in line and "convolution" in line]
    return impls[-1] if impls else "unknown (no oneDNN verbose output)"


def machine_info() -> dict:
    """What a figure was measured on: the CPU model and its vector extensions, the instruction set
    lkfast's kernels ran (LKFAST_CPU_ISA caps it) and the kernel oneDNN ran (ONEDNN_MAX_CPU_ISA caps
    it), threads, versions and the load average when asked (other work on the machine skews times)."""
    import os

    from lkfast.ops.cpu_dispatch import fingerprint

    fp = fingerprint()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        pass
    try:
        load = [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        load = None
    return {
        "cpu_model": fp["cpu"], "cpu_count": os.cpu_count(),
        "cpu_vector_extensions": sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16",
                                                 "avx512_fp16", "amx_tile", "amx_bf16"}),
        "lkfast_isa": fp["isa"], "lkfast_cpu_isa_cap": os.environ.get("LKFAST_CPU_ISA", ""),
        "onednn_max_cpu_isa": fp["onednn_max_cpu_isa"], "onednn_depthwise": onednn_depthwise_implementation(),
        "threads": fp["threads"], "torch": fp["torch"], "lkfast": fp["lkfast"], "load_average": load,
    }


def benchmark_rows(path: str, kind: str, writes_it: str) -> tuple[dict, list[dict]]:
    """A pytest-benchmark JSON file of one of the CPU suites and the ``extra_info`` of its cases of
    ``kind``; none of them is a SystemExit naming ``writes_it``, the command that writes them."""
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind") == kind]
    if not rows:
        raise SystemExit(f"{path}: no {kind} entries (run {writes_it})")
    return data, rows


def run_line(data: dict, machine: dict) -> str:
    """The first line of a suite's table: the machine, threads and torch of the run, its date and commit."""
    return (f"Machine: {machine.get('cpu_model', '?')}, {machine.get('threads', '?')} threads, torch "
            f"{machine.get('torch', '?')}; run {data.get('datetime', '?')}, commit "
            f"{data.get('commit_info', {}).get('id', '?')[:8]}")


def per_round_ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of ``times[a][i] / times[b][i]``: a ratio taken within each interleaved
    round (same stretch of time), which the machine's drift between rounds does not move."""
    import statistics

    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    """fp32 matrix-product GFLOP/s of this machine, the ceiling the kernels are judged against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = min(time_interleaved({"mm": lambda: torch.mm(a, b)}, repeat)["mm"])
    return 2.0 * n**3 / seconds / 1e9


def speedup(impls: dict[str, dict], impl: str, baselines=("pytorch_nchw", "pytorch_channels_last")) -> float:
    """Median over rounds of (fastest baseline in that round / impl in that round); with no
    per-round times, the ratio of the recorded times."""
    present = [b for b in baselines if b in impls]
    rounds = [impls[b].get("times") for b in present] + [impls[impl].get("times")]
    if all(rounds) and len({len(t) for t in rounds}) == 1:
        per_round = [min(impls[b]["times"][r] for b in present) / impls[impl]["times"][r] for r in range(len(rounds[0]))]
        return median(per_round)
    return min(impls[b]["seconds"] for b in present) / impls[impl]["seconds"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_label(name: str) -> str:
    """"fp32", "bf16", "fp16" for a ``DTYPES`` name."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[name]


def summarize(rows: list[dict], peak: float) -> str:
    """Markdown table (through lkfast.tables): one line per (shape, passes), lkfast against
    PyTorch's faster layout; "—" where an implementation did not run."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((tuple(r["shape"]), r["passes"]), {})[r["impl"]] = r
    layout = rows[0].get("input_layout", "channels_last")
    caption = (f"{dtype_label(rows[0].get('dtype', 'float32'))}, batch {rows[0]['shape'][0]}"
               f"{', lkfast given NCHW tensors (its fair baseline: PyTorch NCHW)' if layout == 'nchw' else ''}; "
               f"ms = median of rounds in which all implementations ran in turn; "
               f"speed-up = median over rounds of (PyTorch's faster layout / lkfast) in the same round; "
               f"GFLOP/s counts non-padding multiply-adds; machine fp32 matmul peak {peak:.0f} GFLOP/s")
    header = ["C, H, k", "passes", "PyTorch NCHW", "PyTorch channels_last", "lkfast auto", "lkfast C++ kernel",
              "auto speed-up", "C++ kernel speed-up", "vs NCHW (auto)", "auto GFLOP/s"]
    table = []
    for (shape, passes), impls in by_key.items():
        ms = {k: v["seconds"] * 1e3 for k, v in impls.items()}
        auto = ms.get("lkfast_auto")
        flop = impls[next(iter(impls))]["flop"]
        ratio = lambda impl, digits=2, baselines=("pytorch_nchw", "pytorch_channels_last"): (  # noqa: E731
            f"{speedup(impls, impl, baselines):.{digits}f}×" if impl in impls and set(baselines) & set(impls) else None)
        table.append([f"{shape[1]}, {shape[2]}, {shape[4]}", passes,
                      *(None if ms.get(i) is None else f"{ms[i]:.1f}"
                        for i in ("pytorch_nchw", "pytorch_channels_last", "lkfast_auto", "lkfast_cpu")),
                      ratio("lkfast_auto"), ratio("lkfast_cpu"), ratio("lkfast_auto", 1, ("pytorch_nchw",)),
                      None if auto is None else f"{flop / (auto / 1e3) / 1e9:.0f}"])
    return markdown_table(header, table, align="llrrrrrrrr", caption=caption).rstrip("\n")


def _at_least_one(text: str) -> int:
    """argparse type of --batch and --repeat: an integer >= 1 (0 meant the default, -1 a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def check_json_path(path: str) -> str | None:
    """Why ``path`` (--json) cannot be written, or None: its folder is created and a file written and
    removed in it now, before the benchmark, whose timings were lost to an unusable path at the end."""
    try:
        if os.path.isdir(path):
            return "is a folder: give a file name"
        check_writable(os.path.dirname(os.path.abspath(path)))
    except OSError as error:
        return f"cannot be written ({error.strerror or error}{': ' + str(error.filename) if error.filename else ''})"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lkfast.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 and 2 repetitions")
    parser.add_argument("--batch", type=_at_least_one, default=None, help="batch size (default 8, or 2 with --quick)")
    parser.add_argument("--repeat", type=_at_least_one, default=None,
                        help="timed rounds per shape (default 5, or 2 with --quick)")
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="replknet",
                        help="which model's stage shapes (default replknet: RepLKNet-31B)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the tensors' dtype (default float32; bfloat16 is what --amp runs on the CPU)")
    parser.add_argument("--input-layout", choices=INPUT_LAYOUTS, default="channels_last",
                        help="the layout of lkfast's input (default channels_last; nchw: as an NCHW model "
                             "calls it, to compare with PyTorch's NCHW column)")
    parser.add_argument("--json", default=None,
                        help="also write the raw timings to this JSON file (its folder is created and checked "
                             "before the benchmark starts)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    batch = args.batch if args.batch is not None else (2 if args.quick else 8)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 5)
    if args.json:
        problem = check_json_path(args.json)
        if problem:
            parser.error(f"--json {args.json} {problem}")

    from lkfast.ops import available_backends

    print("backends:")
    for info in available_backends().values():
        print("  ", info)
    machine = machine_info()
    print("machine:", ", ".join(f"{k} {v}" for k, v in machine.items()))
    impls = [i for i in IMPLEMENTATIONS if i != "lkfast_cpu" or available_backends()["cpu"].available]
    peak = matmul_gflops()
    rows = []
    for channels, size, k in shapes_named(args.shapes):
        for passes in PASSES:
            cases = {impl: make_case(impl, passes, batch, channels, size, k, DTYPES[args.dtype],
                                     input_layout=args.input_layout) for impl in impls}
            times = time_interleaved({impl: c.run for impl, c in cases.items()}, repeat)
            for impl, case in cases.items():
                rows.append({"impl": impl, "passes": passes, "shape": list(case.shape), "dtype": args.dtype,
                             "input_layout": args.input_layout,
                             "seconds": median(times[impl]), "times": times[impl], "flop": case.flop})
                print(f"  {case.name:70s} {median(times[impl]) * 1e3:9.1f} ms", flush=True)
    print()
    print(summarize(rows, peak))
    if args.json:
        machine["load_average_after"] = machine_info()["load_average"]
        write_text_atomic(args.json, json.dumps({"threads": torch.get_num_threads(), "matmul_gflops": peak,
                                                 "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

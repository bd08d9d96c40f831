"""GPU benchmark of lkfast's depthwise convolution against PyTorch (cuDNN / its native kernel).

    python benchmarks/bench_gpu.py --out DIR [--budget SECONDS] [--batch 64] [--quick]
    python benchmarks/bench_gpu.py --write-table DIR/gpu_bench.json   # MEASURED of cuda_table.py

Shapes: the four RepLKNet-31B stages at 224 px (56/28/14/7 px maps, k = 31/29/27/13), ConvNeXt's
k = 7 and SLaK's 51x5, batch 64; fp16, bf16, fp32; NCHW and channels_last inputs.

1. Per pass (forward, input gradient, weight gradient) and per backend (cuda, triton, torch): the
   median time with CUDA events. These rows make the ``auto`` table (lkfast/ops/cuda_table.py):
   the fastest backend per pass, PyTorch wherever ours lose.
2. End to end through ``lkfast.ops.depthwise_conv2d`` with the new table installed: forward,
   forward + input grad, forward + both grads, ``auto`` and each backend against PyTorch's fastest
   layout; effective TFLOP/s (2*N*C*H*W*kh*kw per pass) and achieved bandwidth (the minimal bytes:
   inputs read and outputs written once per pass) against the GPU's peaks.
Writes DIR/gpu_bench.json and DIR/gpu_bench.md. Cases are run most important first and skipped
once --budget seconds are spent (and marked so), so a time-boxed run still leaves results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pprint
import re
import sys
import time

import torch

SHAPES = [  # (name, C, H, W, kh, kw)
    ("replknet31b-s1", 128, 56, 56, 31, 31),
    ("replknet31b-s2", 256, 28, 28, 29, 29),
    ("replknet31b-s3", 512, 14, 14, 27, 27),
    ("replknet31b-s4", 1024, 7, 7, 13, 13),
    ("convnext-k7", 96, 56, 56, 7, 7),
    ("slak-51x5", 128, 56, 56, 51, 5),
]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYOUTS = ("channels_last", "nchw")
BACKENDS = ("cuda", "triton", "torch")
DEVICE = "cuda"
# --dry-run: the whole script on tiny shapes on the CPU (wall-clock times), to check it end to end
# on a machine without a GPU before spending GPU time on it.
DRY_RUN_SHAPES = [("tiny-k7", 8, 12, 12, 7, 7)]
PASSES = ("forward", "input_grad", "weight_grad")
MODES = {"forward": 1, "forward+input_grad": 2, "forward+both_grads": 3}  # conv passes per mode

# Peaks (FLOP/s, bytes/s) by device name; fp16/bf16 CUDA-core peak is twice fp32 (packed half2).
PEAKS = {
    "H200": {"float32": 67e12, "half": 134e12, "tensor": 990e12, "bw": 4.8e12},
    "H100": {"float32": 67e12, "half": 134e12, "tensor": 990e12, "bw": 3.35e12},
    "A100": {"float32": 19.5e12, "half": 78e12, "tensor": 312e12, "bw": 2.0e12},
}


def peaks_for(name: str) -> dict | None:
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


def cuda_time_ms(fn, budget_ms=300.0, max_reps=50) -> float:
    """Median of individually timed runs after a warm-up (autotuning happens in the warm-up)."""
    if DEVICE == "cpu":
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[1]
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); fn(); end.record(); torch.cuda.synchronize()
    reps = int(max(3, min(max_reps, budget_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def make_inputs(shape, dtype, layout, batch, grad=False):
    _, C, H, W, kh, kw = shape
    x = torch.randn(batch, C, H, W, device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, kh, kw, device=DEVICE) / math.sqrt(kh * kw)).to(dtype)
    g = torch.randn_like(x)
    if grad:
        x.requires_grad_(True)
    return x, w, g


def per_pass(shape, dtype, layout, batch, results, deadline):
    from lkfast.ops.backends import BACKENDS as IMPL

    x, w, g = make_inputs(shape, dtype, layout, batch)
    kh, kw = shape[4], shape[5]
    for backend in BACKENDS:
        impl = IMPL[backend]
        why = impl.not_supported_reasons(x, w)
        fns = {
            "forward": lambda: impl.forward(x, w, None, False),
            "input_grad": lambda: impl.forward(g, w, None, True),
            "weight_grad": lambda: impl.weight_grad(g, x, kh, kw),
        }
        for name, fn in fns.items():
            row = dict(kind="pass", shape=shape[0], C=shape[1], H=shape[2], W=shape[3], kh=kh, kw=kw,
                       dtype=str(dtype).replace("torch.", ""), layout=layout, batch=batch, backend=backend, op=name)
            if why:
                row["error"] = "; ".join(why)
            elif time.time() > deadline:
                row["error"] = "skipped: time budget spent"
            else:
                try:
                    row["ms"] = cuda_time_ms(fn)
                except Exception as exc:  # a failing backend is a result, not the end of the run
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            results.append(row)


def derive_table(rows) -> dict:
    """{(dtype, layout, kh, kw, C, H, W): (forward, input_grad, weight_grad)}: fastest per pass."""
    best: dict = {}
    for r in rows:
        if r.get("kind") != "pass" or "ms" not in r:
            continue
        key = (r["dtype"], r["layout"], r["kh"], r["kw"], r["C"], r["H"], r["W"])
        slot = best.setdefault(key, {})
        if r["op"] not in slot or r["ms"] < slot[r["op"]][1]:
            slot[r["op"]] = (r["backend"], r["ms"])
    return {k: tuple(v.get(p, ("torch", 0))[0] for p in PASSES) for k, v in best.items()}


def end_to_end(shape, dtype, layout, batch, results, deadline, backends):
    import lkfast.ops as ops

    _, C, H, W, kh, kw = shape
    for mode in MODES:
        for backend in backends:
            row = dict(kind="e2e", shape=shape[0], C=C, H=H, W=W, kh=kh, kw=kw, dtype=str(dtype).replace("torch.", ""),
                       layout=layout, batch=batch, backend=backend, mode=mode)
            if time.time() > deadline:
                row["error"] = "skipped: time budget spent"
                results.append(row)
                continue
            x, w, g = make_inputs(shape, dtype, layout, batch)
            if backend == "torch-nchw":
                x, g, name = x.contiguous(), g.contiguous(), "torch"
            elif backend == "torch-channels_last":
                x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
                name = "torch"
            else:
                name = backend
            x.requires_grad_(mode != "forward")
            w.requires_grad_(mode == "forward+both_grads")

            def run():
                if mode == "forward":
                    with torch.no_grad():
                        ops.depthwise_conv2d(x, w, backend=name)
                else:
                    y = ops.depthwise_conv2d(x, w, backend=name)
                    inputs = [x] + ([w] if mode == "forward+both_grads" else [])
                    torch.autograd.grad(y, inputs, g)

            try:
                if name == "auto":
                    row["plan"] = ",".join(ops.plan_for(x, w))
                row["ms"] = cuda_time_ms(run)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            results.append(row)


def add_rates(rows, device_name):
    peaks = peaks_for(device_name)
    for r in rows:
        if "ms" not in r:
            continue
        passes = MODES.get(r.get("mode"), 1)
        elems = r["batch"] * r["C"] * r["H"] * r["W"]
        elem_bytes = torch.empty(0, dtype=DTYPES[r["dtype"]]).element_size()
        flops = 2.0 * elems * r["kh"] * r["kw"] * passes
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        r["gbps"] = 2.0 * elems * elem_bytes * passes / (r["ms"] * 1e-3) / 1e9
        if peaks:
            compute_peak = peaks["float32" if r["dtype"] == "float32" else "half"]
            r["pct_cuda_core_peak"] = 100 * r["tflops"] * 1e12 / compute_peak
            r["pct_bw_peak"] = 100 * r["gbps"] * 1e9 / peaks["bw"]


def markdown(rows, device_name) -> str:
    lines = [f"# lkfast GPU benchmark ({device_name})", ""]
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    lines += ["## End to end (ms; speed-up of `auto` over PyTorch's faster layout)", "",
              "| shape | dtype | layout | mode | auto (plan) | cuda | triton | torch NCHW | torch channels_last (cuDNN) | auto speed-up | auto TFLOP/s | auto GB/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in e2e:
        groups.setdefault((r["shape"], r["dtype"], r["layout"], r["mode"]), {})[r["backend"]] = r
    fmt = lambda r: f"{r['ms']:.3f}" if r and "ms" in r else ("—" if not r else "err")
    for (shape, dtype, layout, mode), g in groups.items():
        auto = g.get("auto")
        torch_best = min([g[k]["ms"] for k in ("torch-nchw", "torch-channels_last") if k in g and "ms" in g[k]], default=None)
        speed = f"{torch_best / auto['ms']:.2f}x" if auto and "ms" in auto and torch_best else "—"
        plan = f" ({auto.get('plan', '')})" if auto else ""
        rate = lambda key: f"{auto[key]:.1f}" if auto and key in auto else "—"
        lines.append(f"| {shape} | {dtype} | {layout} | {mode} | {fmt(auto)}{plan} | {fmt(g.get('cuda'))} | {fmt(g.get('triton'))} "
                     f"| {fmt(g.get('torch-nchw'))} | {fmt(g.get('torch-channels_last'))} | {speed} | {rate('tflops')} | {rate('gbps')} |")
    errors = sorted({f"{r['backend']}: {r['error']}" for r in rows if "error" in r})
    if errors:
        lines += ["", "## Errors and skips", ""] + [f"- {e}" for e in errors[:40]]
    return "\n".join(lines) + "\n"


def write_table_source(table: dict, device_name: str) -> None:
    """Rewrite MEASURED in lkfast/ops/cuda_table.py from a derived table."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lkfast", "ops", "cuda_table.py")
    src = open(path).read()
    body = "MEASURED: dict[tuple, tuple[str, str, str]] = " + pprint.pformat(dict(sorted(table.items())), width=110) + "\n"
    body += f"MEASURED_ON = {device_name + ', ' + time.strftime('%Y-%m-%d')!r}\n"
    src = re.sub(r"(# --- measured table.*?---\n).*?(# --- end of measured table ---)", lambda m: m.group(1) + body + m.group(2),
                 src, flags=re.S)
    open(path, "w").write(src)
    print(f"wrote {len(table)} rows into {os.path.relpath(path)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", type=float, default=360.0, help="seconds; later cases are skipped")
    parser.add_argument("--quick", action="store_true", help="fp16 only, k=31 and k=7 shapes")
    parser.add_argument("--write-table", metavar="JSON", help="rewrite cuda_table.MEASURED from a gpu_bench.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    args = parser.parse_args(argv)
    global DEVICE, BACKENDS

    if args.write_table:
        data = json.load(open(args.write_table))
        write_table_source({tuple(k): tuple(v) for k, v in data["table"]}, data["device"])
        return 0
    if args.dry_run:
        DEVICE, BACKENDS = "cpu", ("cpu", "torch")
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure (--dry-run checks the script on the CPU)")
        return 2
    os.makedirs(args.out, exist_ok=True)
    from lkfast.ops import cuda_table

    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU dry run"
    deadline = time.time() + args.budget
    shapes = SHAPES if not args.quick else [SHAPES[0], SHAPES[4]]
    dtypes = list(DTYPES) if not args.quick else ["float16"]
    e2e_backends = ["auto", "cuda", "triton", "torch-nchw", "torch-channels_last"]
    if args.dry_run:
        shapes, dtypes, args.batch = DRY_RUN_SHAPES, ["float32"], 2
        e2e_backends = ["auto", "cpu", "torch-nchw", "torch-channels_last"]
    rows: list[dict] = []
    # 1. per pass, per backend -> the auto table (uses ~55% of the budget)
    pass_deadline = time.time() + 0.55 * args.budget
    # dtype-major, fp16 first: the targets are about fp16/bf16, and a cut-off run keeps them
    for dtype in dtypes:
        for shape in shapes:
            for layout in LAYOUTS:
                per_pass(shape, DTYPES[dtype], layout, args.batch, rows, pass_deadline)
    table = derive_table(rows)
    cuda_table.MEASURED.clear()
    cuda_table.MEASURED.update(table)
    # 2. end to end with the table installed
    for dtype in dtypes:
        for shape in shapes:
            for layout in LAYOUTS:
                end_to_end(shape, DTYPES[dtype], layout, args.batch, rows, deadline, e2e_backends)
    add_rates(rows, device_name)
    result = {"device": device_name, "torch": torch.__version__, "batch": args.batch, "peaks": peaks_for(device_name),
              "rows": rows, "table": [[list(k), list(v)] for k, v in table.items()]}
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(markdown(rows, device_name))
    print(markdown(rows, device_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())

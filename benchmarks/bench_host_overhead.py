"""Host time per call of the depthwise op on the CPU: the eager path against the registered op
and PyTorch's F.conv2d, same run.

    pytest benchmarks/bench_host_overhead.py --benchmark-json=benchmarks/results/host_overhead_cpu.json
    python benchmarks/bench_host_overhead.py benchmarks/results/host_overhead_cpu.json   # writes the .md beside it

A plain eager call of ``lkfast.ops.depthwise_conv2d`` runs its backends through a
``torch.autograd.Function`` (lkfast.ops.depthwise ``_Eager``) instead of the registered custom op
(``torch.ops.lkfast.depthwise_conv2d``), whose dispatch is host time spent on every call: what a GPU
waits for when its kernels take less (RepLKNet-31B's stages 3 and 4 on an H200,
benchmarks/results/gpu_h200/host_overhead.log). On the CPU the kernels are slower and the host time
is the same Python, so it is measured here on maps small enough for it to show:

* ``tiny``: (1, 4, 8, 8), 3x3: almost nothing but host time;
* ``replknet31b-s4-b1``: RepLKNet-31B's stage 4 at batch 1 (1, 1024, 7, 7), 13x13: a latency case.

Implementations, each timed over LOOP back-to-back calls per round, in rounds that take them in a
shuffled turn (lkfast.timing.time_interleaved): ``pytorch`` (``F.conv2d``, NCHW, with autograd),
``lkfast_eager`` (backend "cpu", the eager path), ``lkfast_registered`` (backend "cpu" through the
registered op, as every call went before the eager path), ``lkfast_auto`` (the eager path with the
plan chosen per call). Passes: forward (under no_grad) and forward + input gradient.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

CASES = {"tiny": (1, 4, 8, 8, 3), "replknet31b-s4-b1": (1, 1024, 7, 7, 13)}
PASSES = ("forward", "forward+input_grad")
IMPLS = ("pytorch", "lkfast_eager", "lkfast_registered", "lkfast_auto")
LOOP = 100
ROUNDS = 15


def _runner(impl: str, passes: str, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    """A callable that runs LOOP calls of ``impl`` for ``passes``."""
    import lkfast.ops as ops
    from lkfast.ops import depthwise

    k = w.shape[-1]
    if impl == "pytorch":
        conv = lambda a: F.conv2d(a, w, padding=k // 2, groups=a.shape[1])  # noqa: E731
    else:
        backend = "auto" if impl == "lkfast_auto" else "cpu"
        conv = lambda a: ops.depthwise_conv2d(a, w, backend=backend)  # noqa: E731
    # the registered op, forced for the whole loop (the patch costs once per LOOP calls)
    context = (lambda: mock.patch.object(depthwise, "_eager", lambda *args: False)) if impl == "lkfast_registered" \
        else contextlib.nullcontext

    if passes == "forward":
        def run():
            with context(), torch.no_grad():
                for _ in range(LOOP):
                    conv(x)
    else:
        def run():
            with context():
                for _ in range(LOOP):
                    torch.autograd.grad(conv(x), (x,), g)
    return run


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("case", list(CASES))
def test_host_overhead(benchmark, case, passes):
    from lkfast import bench
    from lkfast.ops import available_backends
    from lkfast.timing import time_interleaved

    if not available_backends()["cpu"].available:
        pytest.skip("lkfast's C++ kernels are not built: " + available_backends()["cpu"].reason)
    N, C, H, W, k = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=gen).requires_grad_(True)
    w = torch.randn(C, 1, k, k, generator=gen) / k
    g = torch.randn(N, C, H, W, generator=gen)
    runs = {impl: _runner(impl, passes, x, w, g) for impl in IMPLS}
    times = {}
    benchmark.group = f"{case} {passes}"
    benchmark.pedantic(lambda: times.update(time_interleaved(runs, ROUNDS, warmup=1)), rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(kind="host_overhead", case=case, shape=[N, C, H, W, k], passes=passes, loop=LOOP,
                                times=times, machine=bench.machine_info())
    for impl in IMPLS:
        assert len(times[impl]) == ROUNDS, impl


def report(path: str) -> Path:
    """The markdown table of a --benchmark-json file of this suite, written beside it (.md)."""
    from lkfast import bench

    data, rows = bench.benchmark_rows(path, "host_overhead",
                                      f"pytest benchmarks/bench_host_overhead.py --benchmark-json={path}")
    lines = [bench.run_line(data, rows[0].get("machine", {})), "",
             f"us per call = median over {ROUNDS} interleaved rounds of (round time / {LOOP} calls); ratios are "
             "medians of per-round ratios (same round, same stretch of time)", "",
             "| case | passes | PyTorch F.conv2d | lkfast eager (cpu) | lkfast registered op (cpu) | lkfast auto (eager) "
             "| registered / eager | PyTorch / lkfast auto |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        t = row["times"]
        us = {impl: statistics.median(t[impl]) / row["loop"] * 1e6 for impl in IMPLS}
        ratio = lambda a, b: bench.per_round_ratio(t, a, b)  # noqa: E731
        lines.append(f"| {row['case']} {tuple(row['shape'])} | {row['passes']} | {us['pytorch']:.1f} | "
                     f"{us['lkfast_eager']:.1f} | {us['lkfast_registered']:.1f} | {us['lkfast_auto']:.1f} | "
                     f"{ratio('lkfast_registered', 'lkfast_eager'):.2f}x | {ratio('pytorch', 'lkfast_auto'):.2f}x |")
    out = Path(path).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/bench_host_overhead.py RESULTS.json")
    print(report(sys.argv[1]))

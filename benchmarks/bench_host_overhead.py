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
plan chosen per call, calibrated on this machine), ``lkfast_auto_table`` (the same with
``LKFAST_CALIBRATE=0``, as the embedded default run sets it: the shipped table's choice, kept per
call shape) and ``lkfast_auto_table_unkept`` (that choice worked out afresh on every call, as the op
did with calibration off before 2026-12-07). Passes: forward (under no_grad) and forward + input
gradient.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

CASES = {"tiny": (1, 4, 8, 8, 3), "replknet31b-s4-b1": (1, 1024, 7, 7, 13)}
PASSES = ("forward", "forward+input_grad")
IMPLS = ("pytorch", "lkfast_eager", "lkfast_registered", "lkfast_auto", "lkfast_auto_table", "lkfast_auto_table_unkept")
LOOP = 100
ROUNDS = 15


def _runner(impl: str, passes: str, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    """A callable that runs LOOP calls of ``impl`` for ``passes``."""
    import lkfast.ops as ops
    from lkfast.ops import cpu_dispatch, depthwise

    k = w.shape[-1]
    if impl == "pytorch":
        conv = lambda a: F.conv2d(a, w, padding=k // 2, groups=a.shape[1])  # noqa: E731
    else:
        backend = "auto" if impl.startswith("lkfast_auto") else "cpu"
        conv = lambda a: ops.depthwise_conv2d(a, w, backend=backend)  # noqa: E731
    # the registered op, or calibration off, forced for the whole loop (a patch costs once per LOOP calls)
    contexts = {"lkfast_registered": lambda: mock.patch.object(depthwise, "_eager", lambda *args: False),
                "lkfast_auto_table": lambda: mock.patch.dict(os.environ, {"LKFAST_CALIBRATE": "0"})}

    @contextlib.contextmanager
    def unkept():  # calibration off, nothing kept: the choice worked out on every call
        with mock.patch.dict(os.environ, {"LKFAST_CALIBRATE": "0"}), \
                mock.patch.object(cpu_dispatch, "choices_token", lambda: None):
            yield

    contexts["lkfast_auto_table_unkept"] = unkept
    context = contexts.get(impl, contextlib.nullcontext)

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


TABLE_ROWS = 200


def test_cuda_table_choice(benchmark, tmp_path, monkeypatch):
    """What ``auto`` spends choosing a CUDA call's plan from the measured table (lkfast.ops.cuda_table),
    timed on the CPU (the choice is Python; the GPU name is given, as the tests do): ``fresh``, the
    nearest-row search and its sentence over a TABLE_ROWS-row table (``_choose_in``: a call key not
    seen before, or after the table file changed); ``kept``, ``choose`` for a key it has answered
    while the table is the same; ``asked``, what the op ran per CUDA call before it kept its own
    choices: ``choose`` with the table read from its file (LKFAST_CUDA_TABLE) and each backend asked
    whether it can run the call (on CPU tensors here: the CUDA backend stops at "built without CUDA"
    or "no device", before its launch check, so on a GPU this costs more); ``op``, what each call
    runs now (lkfast.ops.depthwise ``_cuda_plan``: the choice kept per exact call against the file's
    stamp); ``pytorch``, a tiny F.conv2d forward for scale. Same interleaved rounds as the op's host
    time."""
    from lkfast import bench
    from lkfast.ops import cuda_table, depthwise
    from lkfast.ops.backends import Plan
    from lkfast.timing import time_interleaved

    gpu = "NVIDIA H200"
    gen = torch.Generator().manual_seed(0)
    sizes = [(k, n, c, hw) for k in (7, 13, 27, 31, 51) for n in (1, 8, 64, 128, 256) for c in (128, 256, 512, 1024)
             for hw in (7, 14)]  # 200 keys, none the call's own: the nearest-row search runs over all
    rows = {cuda_table.Key(gpu, "float16", "channels_last", k, k, n, c, hw, hw): Plan("cuda", "triton", "torch")
            for k, n, c, hw in sizes}
    assert len(rows) == TABLE_ROWS
    table = cuda_table.Table(rows, "synthetic rows", "<synthetic>")
    x = torch.randn(64, 256, 28, 28, generator=gen).half().to(memory_format=torch.channels_last)
    w = torch.randn(256, 1, 31, 31, generator=gen).half()
    key = cuda_table.key_of(x, w, gpu)
    runnable = cuda_table.TABLE_BACKENDS
    usable = lambda name: True  # noqa: E731
    kept = cuda_table.choose(x, w, usable, gpu=gpu, table=table)
    assert kept == cuda_table._choose_in(table, key, runnable) and "nearest measured row" in kept[1]
    monkeypatch.setenv(cuda_table.ENV_VAR, str(cuda_table.save_table(rows, "synthetic rows", tmp_path / "t.json")))
    checked = lambda name: depthwise._usable(name, x, w)  # noqa: E731
    asked = cuda_table.choose(x, w, checked, gpu=gpu)
    assert depthwise._cuda_plan(x, w, gpu=gpu) == asked
    tiny, tiny_w = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(4, 1, 3, 3, generator=gen)

    def loop(fn):
        def run():
            for _ in range(LOOP):
                fn()
        return run

    runs = {"fresh": loop(lambda: cuda_table._choose_in(table, key, runnable)),
            "kept": loop(lambda: cuda_table.choose(x, w, usable, gpu=gpu, table=table)),
            "asked": loop(lambda: cuda_table.choose(x, w, checked, gpu=gpu)),
            "op": loop(lambda: depthwise._cuda_plan(x, w, gpu=gpu)),
            "pytorch": loop(lambda: F.conv2d(tiny, tiny_w, padding=1, groups=4))}
    times = {}
    benchmark.group = "cuda table choice"
    with torch.no_grad():
        benchmark.pedantic(lambda: times.update(time_interleaved(runs, ROUNDS, warmup=1)), rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(kind="cuda_table_choice", case=f"{TABLE_ROWS}-row table", shape=list(key[3:]),
                                passes="choice", loop=LOOP, times=times, machine=bench.machine_info())
    for name in runs:
        assert len(times[name]) == ROUNDS, name


def report(path: str) -> Path:
    """The markdown table of a --benchmark-json file of this suite, written beside it (.md)."""
    from lkfast import bench

    data, rows = bench.benchmark_rows(path, "host_overhead",
                                      f"pytest benchmarks/bench_host_overhead.py --benchmark-json={path}")
    lines = [bench.run_line(data, rows[0].get("machine", {})), "",
             f"us per call = median over {ROUNDS} interleaved rounds of (round time / {LOOP} calls); ratios are "
             "medians of per-round ratios (same round, same stretch of time)", "",
             "| case | passes | PyTorch F.conv2d | lkfast eager (cpu) | lkfast registered op (cpu) | lkfast auto (eager) "
             "| lkfast auto, shipped table (LKFAST_CALIBRATE=0) | the same, chosen afresh per call (before 2026-12-07) "
             "| registered / eager | PyTorch / lkfast auto | PyTorch / auto, shipped table |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    choices = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind") == "cuda_table_choice"]
    for row in rows:
        t = row["times"]
        us = {impl: f"{statistics.median(t[impl]) / row['loop'] * 1e6:.1f}" if impl in t else "-" for impl in IMPLS}
        ratio = lambda a, b: f"{bench.per_round_ratio(t, a, b):.2f}x" if a in t and b in t else "-"  # noqa: E731
        lines.append(f"| {row['case']} {tuple(row['shape'])} | {row['passes']} | "
                     + " | ".join(us[impl] for impl in IMPLS)
                     + f" | {ratio('lkfast_registered', 'lkfast_eager')} | {ratio('pytorch', 'lkfast_auto')} "
                       f"| {ratio('pytorch', 'lkfast_auto_table')} |")
    for row in choices:
        us = {name: statistics.median(times) / row["loop"] * 1e6 for name, times in row["times"].items()}
        lines += ["", f"auto's plan for a CUDA call, chosen from a {row['case']} (Python, timed here on the CPU): "
                  f"fresh (nearest-row search and its sentence) {us['fresh']:.1f} us, kept (a key already answered, "
                  f"the table unchanged) {us['kept']:.1f} us; a tiny PyTorch F.conv2d forward {us['pytorch']:.1f} us"]
        if "op" in us:  # (files written before the op kept its own choices have neither)
            lines += ["", f"Per call, the op asked the table with every backend's checks and the file read "
                      f"{us['asked']:.1f} us; it keeps the choice per exact call against the file's stamp now: "
                      f"{us['op']:.1f} us ({bench.per_round_ratio(row['times'], 'asked', 'op'):.1f}x less)"]
    out = Path(path).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/bench_host_overhead.py RESULTS.json")
    print(report(sys.argv[1]))

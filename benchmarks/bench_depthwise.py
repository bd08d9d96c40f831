"""CPU benchmark of the depthwise op: lkfast against PyTorch (NCHW and channels_last), same run.

    pytest benchmarks/bench_depthwise.py --benchmark-json=benchmarks/results/depthwise_cpu.json
    python benchmarks/report_depthwise.py benchmarks/results/depthwise_cpu.json   # .md and .png beside it

The four RepLKNet-31B stage shapes at 224 px, batch 8, fp32; forward, forward + input gradient,
forward + both gradients. LKFAST_BENCH_SHAPES=convnext runs ConvNeXt-T's four stages (7x7 kernels)
instead (lkfast.bench.SHAPE_SETS); LKFAST_BENCH_DTYPE=bfloat16 (or float16) times that dtype, PyTorch's
and lkfast's tensors alike (bfloat16: what the eval's --amp runs on the CPU); LKFAST_BENCH_INPUT_LAYOUT=nchw
hands lkfast NCHW tensors (as an NCHW model does; compare with the PyTorch NCHW column) instead of channels_last. The JSON records the machine (CPU model, vector extensions, the instruction
set lkfast and oneDNN ran) in the matmul_peak entry's extra_info["machine"]. To measure the AVX2 paths
of both sides on an AVX-512 machine, set LKFAST_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 for the run. Cases come from lkfast.bench, so `python -m lkfast.bench` measures the same.

One benchmark per (shape, passes): lkfast.timing.time_interleaved runs every implementation once
per round, in an order shuffled each round, and each one's wall-clock times go to extra_info (pytest-benchmark's
own statistics for the test are those of the whole measurement). This machine's speed drifts by tens of
percent over seconds; timing the implementations side by side, round by round, keeps the ratios
honest, where pytest-benchmark's usual back-to-back blocks of rounds would not.
"""
import os

import pytest

from lkfast import bench
from lkfast.timing import time_interleaved
from lkfast.ops import available_backends

BATCH = 8
SHAPES = bench.shapes_named(os.environ.get("LKFAST_BENCH_SHAPES", "replknet"))
DTYPE = os.environ.get("LKFAST_BENCH_DTYPE", "float32")
if DTYPE not in bench.DTYPES:
    raise ValueError(f"LKFAST_BENCH_DTYPE={DTYPE!r}: expected one of {', '.join(bench.DTYPES)}")
INPUT_LAYOUT = os.environ.get("LKFAST_BENCH_INPUT_LAYOUT", "channels_last")
if INPUT_LAYOUT not in bench.INPUT_LAYOUTS:
    raise ValueError(f"LKFAST_BENCH_INPUT_LAYOUT={INPUT_LAYOUT!r}: expected one of {', '.join(bench.INPUT_LAYOUTS)}")
IMPLS = [i for i in bench.IMPLEMENTATIONS if i != "lkfast_cpu" or available_backends()["cpu"].available]


def test_matmul_peak(benchmark):
    """The machine's fp32 matrix-product rate, the ceiling for the effective GFLOP/s."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = {}
    benchmark.pedantic(lambda: times.update(time_interleaved({"mm": lambda: torch.mm(a, b)}, 5)), rounds=1, warmup_rounds=0)
    # The machine's record for the whole file: CPU model, vector extensions, the instruction set
    # each side ran (LKFAST_CPU_ISA / ONEDNN_MAX_CPU_ISA cap them), threads, load average.
    benchmark.extra_info.update(kind="matmul_peak", flop=2.0 * n**3, times=times["mm"], machine=bench.machine_info())


@pytest.mark.parametrize("passes", bench.PASSES)
@pytest.mark.parametrize("stage", SHAPES, ids=lambda s: f"C{s[0]}-H{s[1]}-k{s[2]}")
def test_depthwise(benchmark, stage, passes):
    channels, size, k = stage
    cases = {impl: bench.make_case(impl, passes, BATCH, channels, size, k, bench.DTYPES[DTYPE], input_layout=INPUT_LAYOUT)
             for impl in IMPLS}
    # As many rounds as fit in about 15 s (5 to 31): PyTorch's weight gradient takes seconds per
    # call on the large maps, while the 7x7 maps take milliseconds and need many rounds to settle.
    # warm-up round (allocations, oneDNN primitive creation), timed to size the measured rounds
    first = time_interleaved({impl: c.run for impl, c in cases.items()}, rounds=1, warmup=0)
    rounds = max(5, min(31, int(15.0 / sum(t[0] for t in first.values()))))
    times = {}

    def measure():  # every implementation once per round, order shuffled per round (see lkfast.timing)
        times.update(time_interleaved({impl: c.run for impl, c in cases.items()}, rounds, warmup=0))

    benchmark.group = f"C{channels}-H{size}-k{k} {passes}"
    benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(
        kind="depthwise_round", passes=passes, shape=list(next(iter(cases.values())).shape), dtype=DTYPE,
        input_layout=INPUT_LAYOUT,
        flop=next(iter(cases.values())).flop, times=times,
    )
    for impl, t in times.items():
        assert len(t) == rounds, impl

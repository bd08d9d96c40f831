"""CPU benchmark of the depthwise op: lkfast against PyTorch (NCHW and channels_last), same run.

    pytest benchmarks/bench_depthwise.py --benchmark-json=benchmarks/results/depthwise_cpu.json
    python benchmarks/report_depthwise.py benchmarks/results/depthwise_cpu.json > benchmarks/results/depthwise_cpu.md

The four RepLKNet-31B stage shapes at 224 px, batch 8, fp32; forward, forward + input gradient,
forward + both gradients. Cases come from lkfast.bench so `python -m lkfast.bench` measures the same.
"""
import pytest

from lkfast import bench
from lkfast.ops import available_backends

BATCH = 8
IMPLS = [i for i in bench.IMPLEMENTATIONS if i != "lkfast_cpu" or available_backends()["cpu"].available]


def test_matmul_peak(benchmark):
    """The machine's fp32 matrix-product rate, the ceiling for the effective GFLOP/s."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    benchmark.extra_info.update(kind="matmul_peak", flop=2.0 * n**3)
    benchmark.pedantic(torch.mm, args=(a, b), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", bench.PASSES)
@pytest.mark.parametrize("stage", bench.STAGE_SHAPES, ids=lambda s: f"C{s[0]}-H{s[1]}-k{s[2]}")
def test_depthwise(benchmark, stage, passes, impl):
    channels, size, k = stage
    case = bench.make_case(impl, passes, BATCH, channels, size, k)
    benchmark.group = f"C{channels}-H{size}-k{k} {passes}"
    benchmark.extra_info.update(kind="depthwise", impl=impl, passes=passes, shape=list(case.shape), flop=case.flop)
    # The PyTorch NCHW weight gradient takes seconds per call here: few rounds, best of them reported.
    slow = impl == "pytorch_nchw" or (passes.endswith("weight_grad") and impl.startswith("pytorch"))
    benchmark.pedantic(case.run, rounds=3 if slow else 15, warmup_rounds=2)

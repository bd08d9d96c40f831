"""Linears on activations (ConvNeXt's NHWC MLPs, ViT's tokens) as PyTorch runs them against the
1x1 convolution of the same memory and against lkfast's calibrated choice between the two, same run.

    OMP_WAIT_POLICY=PASSIVE pytest benchmarks/bench_pointwise_linear.py \
        --benchmark-json=benchmarks/results/pointwise_linear_cpu.json
    python benchmarks/bench_pointwise_linear.py benchmarks/results/pointwise_linear_cpu.json   # the .md beside it

Shapes: the eight MLP linears of ConvNeXt-T (timm ``convnext_tiny``, ``conv_mlp=False``: the MLP runs
``nn.Linear`` on (N, H, W, C) activations) at 224x224: per stage (56x56, 96), (28x28, 192),
(14x14, 384), (7x7, 768), fc1 C -> 4C and fc2 4C -> C; and the four of a ViT-B/16 block at 224x224
on (N, 197, 768) tokens: qkv 768 -> 2304, proj 768 -> 768, fc1 768 -> 3072, fc2 3072 -> 768;
batch LKFAST_BENCH_BATCH (8), fp32.
Implementations: ``pytorch`` (``F.linear``: what ``nn.Linear`` runs, MKL's SGEMM on the CPU),
``conv`` (``F.conv2d`` of the channels_last view ``x.permute(0, 3, 1, 2)`` with the weight as
(out, in, 1, 1): oneDNN's 1x1 convolution, no copy, forced by LKFAST_POINTWISE=conv) and
``lkfast_auto`` (``lkfast.nn.pointwise_linear``, what ``patch_model``'s ``PointwiseLinear`` runs:
the faster of the two as this machine's calibration measured it for the pass, with its backward
where one runs; the JSON records its choice).
Passes: ``forward`` (no_grad), ``forward+input_grad`` (frozen weights: an attack step),
``training`` (input, weight and bias gradients). Each case first checks that both other
implementations give F.linear's outputs within 1e-5 relative. Timer: ``lkfast.timing.time_interleaved``,
ROUNDS interleaved rounds after a warm-up, clock ``time.process_time`` (CPU seconds of the process;
with OMP_WAIT_POLICY=PASSIVE idle threads sleep instead of spinning), as bench_models.py.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

BATCH = int(os.environ.get("LKFAST_BENCH_BATCH", 8))
ROUNDS = int(os.environ.get("LKFAST_BENCH_ROUNDS", 9))
STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))  # ConvNeXt-T at 224x224: (map side, channels)
# name -> (input shape without the batch, output features)
SHAPES = {f"s{i + 1}-{name}": ((side, side, cin), cout) for i, (side, c) in enumerate(STAGES)
          for name, cin, cout in (("fc1", c, 4 * c), ("fc2", 4 * c, c))}
SHAPES.update({f"vitb-{name}": ((197, cin), cout) for name, cin, cout in
               (("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768))})
PASSES = ("forward", "forward+input_grad", "training")
IMPLS = ("pytorch", "conv", "lkfast_auto")


def _linear(impl: str):
    from lkfast.nn import pointwise_linear

    if impl == "pytorch":
        return F.linear
    if impl == "conv":
        def conv(x, w, b):
            with mock.patch.dict(os.environ, {"LKFAST_POINTWISE": "conv"}):
                return pointwise_linear(x, w, b)
        return conv
    return pointwise_linear


def _runner(impl: str, passes: str, x, w, b, g):
    linear = _linear(impl)
    if passes == "forward":
        def run():
            with torch.no_grad():
                linear(x, w, b)
    elif passes == "forward+input_grad":
        xi = x.detach().requires_grad_(True)

        def run():
            torch.autograd.grad(linear(xi, w, b), (xi,), g)
    else:
        xi, wi, bi = (t.detach().requires_grad_(True) for t in (x, w, b))

        def run():
            torch.autograd.grad(linear(xi, wi, bi), (xi, wi, bi), g)
    return run


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_pointwise_linear(benchmark, shape, passes):
    from lkfast import bench
    from lkfast.nn.pointwise import linear_choice
    from lkfast.timing import time_interleaved

    dims, cout = SHAPES[shape]
    cin = dims[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *dims, generator=gen)
    w = torch.randn(cout, cin, generator=gen) / cin ** 0.5
    b = torch.randn(cout, generator=gen)
    g = torch.randn(BATCH, *dims[:-1], cout, generator=gen)
    want = F.linear(x, w, b)
    for impl in ("conv", "lkfast_auto"):
        got = _linear(impl)(x, w, b)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert got.shape == want.shape and got.is_contiguous() and err < 1e-5, f"{impl}: {err:.2e}"
    # the choice for this pass (a call whose backward will run is calibrated with it), measured now
    # when this machine had not yet
    if passes == "forward":
        with torch.no_grad():
            choice = linear_choice(x, w)
    else:
        choice = linear_choice(x.detach().requires_grad_(True), w.detach().requires_grad_(passes == "training"))
    runs = {impl: _runner(impl, passes, x, w, b, g) for impl in IMPLS}
    times = {}
    benchmark.group = f"{shape} {passes}"
    benchmark.pedantic(lambda: times.update(time_interleaved(runs, ROUNDS, warmup=1, clock=time.process_time)),
                       rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(kind="pointwise_linear", shape_name=shape, shape=[BATCH, *dims, cout],
                                passes=passes, times=times, auto_choice=choice.backend, auto_source=choice.source,
                                clock="time.process_time", machine=bench.machine_info(),
                                threads=torch.get_num_threads())
    for impl in IMPLS:
        assert len(times[impl]) == ROUNDS, impl


def report(path: str) -> Path:
    """The markdown table of a --benchmark-json file of this suite, written beside it (.md)."""
    from lkfast import bench

    data, rows = bench.benchmark_rows(path, "pointwise_linear",
                                      f"pytest benchmarks/bench_pointwise_linear.py --benchmark-json={path}")
    lines = [bench.run_line(data, dict(rows[0].get("machine", {}), threads=rows[0].get("threads", "?"))), "",
             f"ms = median CPU time (time.process_time) over {ROUNDS} interleaved rounds; ratios are medians of "
             "per-round ratios (same round, same stretch of time); *auto* is `lkfast.nn.pointwise_linear` with this "
             "machine's calibrated choice for the pass (what `patch_model`'s `PointwiseLinear` runs)", "",
             "| shape (input -> out features) | passes | PyTorch F.linear (ms) | 1x1 conv (ms) | lkfast auto (ms) "
             "| auto's choice | F.linear / conv | F.linear / auto |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for row in rows:
        t = row["times"]
        ms = {impl: statistics.median(t[impl]) * 1e3 for impl in IMPLS}
        ratio = lambda a, b: bench.per_round_ratio(t, a, b)  # noqa: E731
        *dims, cout = row["shape"]
        lines.append(f"| {row['shape_name']} ({', '.join(map(str, dims))} -> {cout}) | {row['passes']} | {ms['pytorch']:.1f} | "
                     f"{ms['conv']:.1f} | {ms['lkfast_auto']:.1f} | {row['auto_choice']} | "
                     f"{ratio('pytorch', 'conv'):.2f}x | {ratio('pytorch', 'lkfast_auto'):.2f}x |")
    out = Path(path).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/bench_pointwise_linear.py RESULTS.json")
    print(report(sys.argv[1]))

"""Inf and NaN through the C++ CPU kernels land exactly where F.conv2d's sum puts them.

The convolution's output at a pixel is a sum over the taps that meet pixels inside the image; zero
padding contributes no term. The kernels skip much of the padding but multiply some of it, which is
harmless for finite values and wrong for non-finite ones (0 * Inf = 0 * NaN = NaN). These tests
plant NaN, +Inf and -Inf in the input, the output gradient and the weight, and require the NaN,
+Inf and -Inf masks of the forward, input gradient and weight gradient to equal those of
``exact_reference`` (the sum over in-image terms only, in fp64), with finite values within the
usual tolerances: maps narrower and shorter than the kernel, RepLKNet's proportions, normal maps;
fp32, fp64, fp16, bf16; NCHW and channels_last; every instruction set this CPU has.

Why a reference of our own and not F.conv2d itself: PyTorch's CPU backends are not exact here
either, and not alike (torch 2.14, measured on the cases below): oneDNN's fp32 and bf16 forward with
a NaN weight tap is exact, while the fp64 and fp16 path (im2col and a matrix product) gives NaN in
every output of that channel, forward and input gradient; the weight gradient from a NaN in the
output gradient has NaN at taps that meet only padding in every dtype and layout on most shapes.
PyTorch's non-finite outputs were a superset of the exact ones (extra NaN only); where PyTorch is
exact, ``exact_reference`` agrees with it (``test_exact_reference_is_conv2d``).
"""

import pytest
import torch
import torch.nn.functional as F

from reference import (ISA_ORDER, TOLERANCE, assert_nonfinite_match, backend_or_skip, case_id, cpu_kernels_on_isa,
                       exact_conv, exact_reference, make_case, plant_map, reference, run_op)

PASS_NAMES = ("forward", "input_grad", "weight_grad")


# (N, C, H, W, kh, kw)
SHAPES = [
    (2, 20, 9, 12, 15, 15),   # narrower and shorter than the kernel, wider than its half: band loops
    (1, 18, 28, 28, 29, 29),  # RepLKNet's stage 2 proportions
    (2, 70, 7, 7, 13, 13),    # the small-map kernel, one channel block over a group of images (see SMALL_MAP)
    (2, 17, 20, 21, 5, 5),    # a map larger than the kernel: tap loops
    (1, 9, 23, 11, 5, 17),    # rectangular kernel, narrow map, tall
    # whole channel blocks: channels_last fp32/fp64/bf16 forward in place, zero vectors past the edges
    (2, 32, 10, 19, 7, 7),    # a tap row's weights held (a width compiled in)
    (1, 16, 9, 13, 11, 9),    # the rotation over the taps meeting the image
]
# The small-map kernel runs only with at least two channel blocks per thread: 70 channels are 5
# blocks of fp32 (9 of fp64), so its case runs on at most 2 threads, whatever the machine.
SMALL_MAP = (2, 70, 7, 7, 13, 13)
WHERE = ["input", "grad_out", "weight", "all"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_nonfinite_placement_matches_exact_sum(shape, fmt, dtype, where):
    backend = backend_or_skip("cpu", "cpu", dtype)
    x, weight, grad_out = make_case(shape, fmt, dtype, where)
    threads = torch.get_num_threads()
    if shape == SMALL_MAP:
        torch.set_num_threads(min(threads, 2))
    try:
        got = run_op(x, weight, None, grad_out, backend)
    finally:
        torch.set_num_threads(threads)
    want = exact_reference(x, weight, grad_out)
    for name in PASS_NAMES:
        assert_nonfinite_match(got[name], want[name], TOLERANCE[dtype][name], f"{shape} {fmt} {dtype} {where} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exact_reference_is_conv2d(dtype):
    """The reference of this file is F.conv2d's results on finite values, and where PyTorch itself
    is exact (a NaN or Inf in the input, for the forward), its masks too."""
    shape = (2, 20, 9, 12, 15, 15)
    x, weight, grad_out = make_case(shape, "contiguous", dtype, "none")
    want = reference(x, weight, None, grad_out)
    got = exact_reference(x, weight, grad_out)
    for name in PASS_NAMES:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10)
    x = plant_map(x, 0)
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x.double(), weight.double(), padding=(kh // 2, kw // 2), groups=x.shape[1])
    assert_nonfinite_match(y, exact_conv(x, weight), 1e-10, "F.conv2d forward with non-finite input")


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_nonfinite_placement_every_instruction_set(isa, tmp_path):
    """The same on each instruction set's code (LKFAST_CPU_ISA, read once per process, so in a child
    process): AVX2's blocks of at most 7 and rows in groups of 4, the small-map kernels (on AVX2 the
    forward's row of 7 outputs and both half-pixels in one register block), AVX2's NCHW planes (a
    non-finite weight sends the call to the tiles)."""
    backend_or_skip("cpu")
    cases = [make_case(shape, fmt, dtype, where)
             for shape, fmt, dtype in [((2, 20, 9, 12, 15, 15), "contiguous", torch.float32),
                                       ((1, 18, 28, 28, 29, 29), "channels_last", torch.float32),
                                       ((2, 9, 17, 30, 11, 11), "contiguous", torch.float64),  # groups of 4 rows
                                       ((2, 70, 7, 7, 13, 13), "channels_last", torch.float32),
                                       ((2, 32, 10, 19, 7, 7), "channels_last", torch.float32),  # in place
                                       ((2, 5, 10, 19, 7, 7), "contiguous", torch.float32),  # NCHW planes (AVX2)
                                       ((2, 32, 10, 19, 7, 7), "channels_last", torch.bfloat16),  # in place, bf16
                                       ((1, 20, 30, 21, 15, 15), "contiguous", torch.bfloat16),  # bf16 pairs (AVX512-BF16)
                                       ((1, 16, 9, 13, 11, 9), "channels_last", torch.float64)]
             for where in WHERE]
    cases = [(x, w, g, None) for x, w, g in cases]  # no bias (exact_reference has none)
    # 2 threads: the small-map case's 5 channel blocks reach its kernel on at most 2 threads
    for (x, w, g, _), outputs in zip(cases, cpu_kernels_on_isa(isa, cases, tmp_path, threads=2)):
        want = exact_reference(x, w, g)
        for name, got in zip(PASS_NAMES, outputs):
            assert_nonfinite_match(got, want[name], TOLERANCE[x.dtype][name], f"{isa} {tuple(x.shape)} {x.dtype} {name}")

"""lkfast.ops.depthwise_conv2d against torch.nn.functional.conv2d(..., groups=C) in fp64: forward,
input gradient, weight gradient and bias gradient, for every backend on every device type it runs on
(those that cannot run here are skipped with the backend's own reason), over kernel sizes,
rectangular kernels, maps smaller than the kernel, odd sizes, batch 1, memory layouts and dtypes.
``auto`` is checked to run exactly the backends ``plan_for`` names. The reference, tolerances and
input makers are those of tests/reference.py."""
import os
import subprocess
import sys

import pytest
import torch

import lkfast.ops as ops
from lkfast.ops.backends import BACKENDS, FLOAT_DTYPES, PASSES, Plan, dtype_name
from reference import (BACKEND_DEVICES, DEVICES, FORMATS, ISA_ORDER, PASS_NAMES, TOLERANCE, backend_or_skip, case_id,
                       func_transforms,
                       check_op, cpu_kernels_on_isa,
                       device_or_skip, make_input, make_weight, reference, rel_err, run_op)

# (N, C, H, W, kh, kw)
SHAPES = [
    (2, 16, 14, 14, 3, 3),
    (2, 20, 13, 11, 5, 5),
    (1, 16, 15, 17, 7, 7),
    (2, 24, 19, 19, 13, 13),
    (2, 8, 17, 16, 31, 31),
    (1, 10, 13, 11, 51, 51),
    (2, 12, 7, 7, 13, 13),  # map smaller than the kernel
    (1, 16, 7, 7, 31, 31),  # RepLKNet stage-4 map with a stage-1 kernel
    (2, 9, 11, 23, 51, 5),  # SLaK's rectangular kernels
    (2, 9, 23, 11, 5, 51),
    (1, 7, 9, 9, 1, 31),
    (2, 5, 6, 5, 1, 1),
    (1, 33, 9, 9, 63, 63),  # largest kernel of the contract; channels not a multiple of 16
    # the CPU kernel's small-map order (one channel block over a group of images, weights packed
    # per item): 5 blocks of 16 channels (the last one of 6), images grouped 2 + 1; on AVX-512 the
    # compile-time-width kernel, in channels_last straight on x and y for the 4 whole blocks
    (3, 70, 7, 7, 13, 13),
    # the same at RepLKNet's stage-3 proportions, a 13-wide map: two register blocks (7 + 6) a row
    (2, 70, 14, 13, 27, 27),
]
OTHER_DTYPES = [torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_conv2d_fp32(backend_device, shape, fmt, bias):
    backend, device = backend_device
    check_op(backend_or_skip(backend, device), shape, fmt, torch.float32, device, bias=bias)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES, ids=case_id)
@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 15, 13, 13, 13), (1, 17, 8, 9, 31, 5), (3, 70, 7, 7, 13, 13)], ids=case_id)
def test_matches_conv2d_other_dtypes(backend_device, dtype, fmt, shape):
    backend, device = backend_device
    check_op(backend_or_skip(backend, device, dtype), shape, fmt, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_runs_what_plan_for_names(device, dtype, fmt, monkeypatch):
    """auto calls, for each pass, the backend plan_for names (and no other), its results are bit
    for bit that backend's (so the backend matrix above covers auto too), and match the reference."""
    device_or_skip(device)
    N, C, H, W, kh, kw = 2, 12, 11, 9, 7, 5
    x = make_input((N, C, H, W), fmt, dtype, device)
    weight = make_weight(C, kh, kw, dtype, device)
    bias = torch.randn(C, device=device).to(dtype)
    grad_out = make_input((N, C, H, W), fmt, dtype, device)
    plan = ops.plan_for(x, weight)
    by_backend = {name: run_op(x, weight, bias, grad_out, name) for name in set(plan)}
    calls = []
    for name, backend in BACKENDS.items():
        def forward(x, weight, bias=None, flip=False, _name=name, _run=backend.forward):
            calls.append(("input_grad" if flip else "forward", _name))
            return _run(x, weight, bias, flip)

        def weight_grad(grad_out, x, kh, kw, _name=name, _run=backend.weight_grad):
            calls.append(("weight_grad", _name))
            return _run(grad_out, x, kh, kw)

        monkeypatch.setattr(backend, "forward", forward)
        monkeypatch.setattr(backend, "weight_grad", weight_grad)
    got = run_op(x, weight, bias, grad_out, "auto")
    assert sorted(calls) == sorted(zip(PASSES, plan))
    for pass_name, backend in zip(PASSES, plan):
        if device == "cpu":  # (cuDNN's weight gradient may reduce in a different order each call)
            assert torch.equal(got[pass_name], by_backend[backend][pass_name]), (pass_name, plan)
    want = reference(x, weight, bias, grad_out)
    for name in PASS_NAMES:
        assert rel_err(got[name], want[name]) < TOLERANCE[dtype][name], name


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES, ids=case_id)
def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    backend = backend_or_skip(backend, device, torch.float64)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(3, 1, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: ops.depthwise_conv2d(a, w, b, backend=backend), (x, weight, bias))



@pytest.mark.parametrize("backend_device", BACKEND_DEVICES, ids=case_id)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_second_order_gradients(backend_device, fmt):
    """create_graph=True (gradient penalties, Hessian-vector products, as nn.Conv2d allows): the
    gradients are differentiable again, gradgradcheck passes, and a gradient penalty's gradients
    match F.conv2d's."""
    backend, device = backend_device
    backend = backend_or_skip(backend, device, torch.float64)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=g).to(device).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    weight = torch.randn(3, 1, 5, 3, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    bias = torch.randn(3, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    op = lambda a, w, b: ops.depthwise_conv2d(a, w, b, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(op, (x, weight, bias))

    def penalty_grads(conv):
        gx, gw = torch.autograd.grad(conv(x, weight, bias).square().sum(), (x, weight), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, weight, bias))

    want = penalty_grads(lambda a, w, b: torch.nn.functional.conv2d(a, w, b, padding=(2, 1), groups=3))
    for got, expected in zip(penalty_grads(op), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

@pytest.mark.parametrize("isa", ISA_ORDER)
def test_cpu_every_instruction_set(isa, tmp_path):
    """The C++ kernels pick AVX-512, AVX2 or the generic path at run time; LKFAST_CPU_ISA caps the
    choice, read once per process, so each path runs in a child process: fp32 and fp64, NCHW and
    channels_last, a map smaller than the kernel, forward, input gradient and weight gradient.
    The later cases reach the AVX2 path's own blocking (half-vectors of 8 channels, rows split into
    near-equal blocks of at most 7, rows taken in groups of 4 on maps wider than 16).
    A path this CPU does not have is skipped, saying which path ran instead."""
    backend_or_skip("cpu")
    cases = []
    for shape, k, dtype, fmt in [((2, 19, 13, 12), (9, 7), torch.float32, "contiguous"),
                                 ((2, 19, 13, 12), (9, 7), torch.float64, "contiguous"),
                                 ((2, 21, 10, 11), (7, 9), torch.float32, "channels_last"),
                                 ((1, 5, 4, 6), (9, 11), torch.float32, "contiguous"),   # map smaller than the kernel
                                 ((1, 6, 5, 3), (7, 7), torch.float64, "channels_last"),
                                 ((2, 9, 13, 13), (7, 7), torch.float32, "channels_last"),  # 9 channels: 8 + 1 lanes; W 7 + 6
                                 ((1, 17, 19, 23), (9, 15), torch.float32, "contiguous"),  # row groups 4 x 4 + 3; taps 5 + 5 + 5
                                 ((1, 3, 21, 18), (31, 31), torch.float32, "contiguous"),  # grouped rows, kernel wider than the map
                                 ((1, 5, 17, 40), (5, 1), torch.float32, "channels_last"),  # one tap per block; W 7+7+7+7+6+6
                                 ((2, 6, 22, 29), (1, 29), torch.float64, "channels_last"),  # fp64: 4 lanes a ymm
                                 ((1, 8, 5, 1), (3, 3), torch.float32, "contiguous"),  # one-pixel-wide map
                                 # small maps, many channels: one channel block over a group of images
                                 ((3, 70, 6, 5), (9, 11), torch.float32, "channels_last"),
                                 ((3, 70, 6, 5), (9, 11), torch.float64, "contiguous"),
                                 # RepLKNet's stage 4 (7x7 map, 13x13 kernel): on AVX2 the small-map
                                 # forward with a row's 7 outputs and both half-pixels in one register
                                 # block, read in place (fp32 channels_last) and from packed tiles (fp64)
                                 ((2, 70, 7, 7), (13, 13), torch.float32, "channels_last"),
                                 ((1, 5, 7, 7), (13, 13), torch.float64, "contiguous"),
                                 # bf16 packed tiles: on AVX512-BF16 in pairs of tap rows (the last
                                 # pair's second row zero for odd kh), a tile's first pair row above it
                                 ((1, 3, 21, 18), (31, 31), torch.bfloat16, "contiguous"),
                                 ((1, 16, 40, 9), (15, 3), torch.bfloat16, "contiguous"),  # 8 row chunks
                                 ((2, 20, 12, 30), (17, 17), torch.bfloat16, "channels_last"),  # 16 + 4 lanes
                                 ((1, 70, 16, 16), (29, 29), torch.bfloat16, "contiguous"),  # a block over images
                                 ((2, 6, 9, 11), (1, 15), torch.bfloat16, "contiguous"),  # one pair, half zero
                                 ((2, 6, 9, 11), (15, 1), torch.bfloat16, "contiguous"),
                                 ((1, 16, 5, 30), (31, 31), torch.bfloat16, "contiguous"),  # H <= kh / 2
                                 ((2, 70, 7, 7), (13, 13), torch.bfloat16, "channels_last"),  # small maps: fp32
                                 ((1, 16, 5, 6), (13, 11), torch.bfloat16, "contiguous"),  # (up to 7 wide)
                                 ((2, 20, 12, 12), (23, 23), torch.bfloat16, "channels_last")]:  # pairs
        # every forward with a bias, every input gradient (the same kernels) without one
        cases.append((make_input(shape, fmt, dtype), make_weight(shape[1], *k, dtype), make_input(shape, fmt, dtype),
                      torch.randn(shape[1], dtype=dtype)))
    for (x, w, g, b), outputs in zip(cases, cpu_kernels_on_isa(isa, cases, tmp_path)):
        want = reference(x, w, b, g)
        for name, got in zip(PASSES, outputs):
            assert got.dtype == x.dtype
            assert rel_err(got, want[name]) < TOLERANCE[x.dtype][name], (isa, tuple(x.shape), x.dtype, name)


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_cpu_channels_last_in_place(isa, tmp_path):
    """On channels_last fp32/fp64 with whole channel blocks the C++ kernels read the tensors in place,
    with no padded tile: the forward (and the input gradient, its flipped twin) for kernels up to 13
    wide, the weight gradient for 3, 5 and 7 wide. Forward: the widths compiled in (3, 5, 7: a tap
    row's weights held, each input loaded once) and the others (9-13: the rotation over the taps
    meeting the image); rows of 8-wide register blocks and a remainder, blocks reaching past both
    edges at once, one-pixel-wide maps, rectangular kernels, and the small-map order (one channel
    block over a group of images) on a map the small-map kernel does not take, at batch 2 and at
    batch 8 (where every thread has whole images: all blocks of an image per item, in address
    order), and once with an output large enough to be pre-faulted. Weight gradient: the
    rows' end pixels (tested per tap) and middles (the rotation), maps no wider than the kernel.
    Both: x, y and the output gradient with strides other than a contiguous tensor's (cropped views).
    Each instruction set's code in a child process, on 2 threads (so the small-map order is reached)."""
    backend_or_skip("cpu")
    cases = []
    for shape, k, dtype, crop in [((2, 32, 9, 19), (7, 7), torch.float32, False),   # blocks 8 + 8 + 3
                                  ((1, 16, 6, 3), (5, 5), torch.float32, False),    # one block, both edges
                                  ((2, 16, 11, 24), (3, 3), torch.float32, False),  # 3 whole blocks
                                  ((1, 16, 5, 1), (7, 7), torch.float32, False),    # one-pixel-wide map
                                  ((2, 16, 8, 13), (3, 7), torch.float64, False),   # fp64: 8 lanes a block
                                  ((1, 32, 7, 17), (9, 13), torch.float32, False),  # a width not compiled in
                                  ((2, 16, 12, 10), (13, 11), torch.float64, False),
                                  ((1, 32, 10, 12), (7, 5), torch.float32, True),   # a cropped view
                                  ((2, 128, 5, 6), (7, 7), torch.float32, False),  # the small-map order
                                  # 8 images on 2 threads, no small-map kernel: all blocks of an image
                                  # per item, in address order (where the small-map order would be)
                                  ((8, 128, 5, 6), (7, 7), torch.float32, False),
                                  ((8, 64, 5, 6), (7, 7), torch.float64, False),  # fp64: 8 blocks of 8
                                  # the small-map order with an output over 1 MB: its pages faulted in first
                                  ((2, 1024, 9, 16), (13, 13), torch.float32, False),
                                  # bf16 forward in place, widened on load and rounded on store: the
                                  # compiled-in widths, a window width, both orders, a cropped view
                                  ((2, 32, 9, 19), (7, 7), torch.bfloat16, False),
                                  ((1, 32, 7, 17), (9, 13), torch.bfloat16, False),
                                  ((2, 128, 5, 6), (7, 7), torch.bfloat16, False),
                                  ((8, 128, 5, 6), (7, 7), torch.bfloat16, False),
                                  ((1, 32, 10, 12), (7, 5), torch.bfloat16, True)]:
        N, C, H, W = shape
        x = make_input((N, C, H + 3 * crop, W + 2 * crop), "channels_last", dtype)
        g = make_input((N, C, H + 3 * crop, W + 2 * crop), "channels_last", dtype)
        if crop:
            x, g = x[:, :, 2:-1, 1:-1], g[:, :, 1:-2, 2:]
            assert x.stride(1) == 1 and x.stride(2) != W * C
        cases.append((x, make_weight(C, *k, dtype), g, torch.randn(C, dtype=dtype)))  # a bias for the forward
    for (x, w, g, b), outputs in zip(cases, cpu_kernels_on_isa(isa, cases, tmp_path, threads=2)):
        want = reference(x, w, b, g)
        for name, got in zip(PASSES, outputs):
            assert got.dtype == x.dtype
            assert rel_err(got, want[name]) < TOLERANCE[x.dtype][name], (isa, tuple(x.shape), x.dtype, name)


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_cpu_nchw_planes(isa, tmp_path):
    """On contiguous NCHW fp32/fp64 with square kernels 3, 5 or 7 wide and maps at least 8 wide,
    AVX2's forward (and input gradient, its flipped twin) runs plane by plane along the rows
    (forward_planes), no channels-innermost tiles: columns of one vector, a row's last one ending at
    its end (overlapping the one before) or not; blocks of 8, 10 or 12 rows (kernels 7, 5, 3) and
    the last rows in a block of as many; maps shorter than the kernel and shorter than half of it
    (input rows outside the image skipped), one-row maps, a bias; fp64's 4 lanes. Beside them, NCHW
    cases the planes leave to the tiles: 7 wide, rectangular kernels, 9 wide. The other instruction
    sets take every case through their tiles. On 2 threads (a contiguous range of planes each, the
    next plane copied while one is computed)."""
    backend_or_skip("cpu")
    cases = []
    for shape, k, dtype in [((2, 5, 14, 14), (7, 7), torch.float32),      # 2 columns, 8 + 6 rows
                            ((2, 4, 28, 28), (7, 7), torch.float32),      # 4 columns, the last overlapping
                            ((1, 3, 30, 56), (5, 5), torch.float32),      # 7 columns: 3 blocks of 10 rows
                            ((1, 2, 13, 100), (3, 3), torch.float32),     # 13 columns, 12 + 1 rows
                            ((1, 3, 3, 40), (7, 7), torch.float32),       # H < kh / 2 + 1: zero rows both sides
                            ((2, 3, 9, 8), (7, 7), torch.float32),        # one column, exactly a vector
                            ((1, 1, 1, 17), (5, 5), torch.float32),       # one row, one channel
                            ((2, 3, 11, 9), (3, 3), torch.float64),       # fp64: 3 columns, the last overlapping
                            ((1, 2, 21, 33), (7, 7), torch.float64),      # fp64: 9 columns, 8 + 8 + 5 rows
                            ((2, 4, 9, 7), (7, 7), torch.float32),        # 7 wide: the tiles
                            ((1, 3, 9, 16), (7, 3), torch.float32),       # rectangular: the tiles
                            ((1, 2, 12, 20), (9, 9), torch.float32)]:     # 9 wide: the tiles
        N, C, H, W = shape
        cases.append((make_input(shape, "contiguous", dtype), make_weight(C, *k, dtype),
                       make_input(shape, "contiguous", dtype), torch.randn(C, dtype=dtype)))
    for (x, w, g, b), outputs in zip(cases, cpu_kernels_on_isa(isa, cases, tmp_path, threads=2)):
        want = reference(x, w, b, g)
        for name, got in zip(PASSES, outputs):
            assert got.dtype == x.dtype and got.is_contiguous()
            assert rel_err(got, want[name]) < TOLERANCE[x.dtype][name], (isa, tuple(x.shape), x.dtype, name)


@pytest.mark.parametrize("isa", ISA_ORDER)
def test_cpu_bf16_in_place_rounds_as_the_packed_path(isa, tmp_path):
    """The bf16 forward in place (channels_last, whole channel blocks, kernels up to 13 wide) widens
    each input vector to fp32 and rounds each output vector back itself; the packed path (the same
    values in NCHW) converts one value at a time with c10::BFloat16. Same fp32 sums, so the two must
    agree bit for bit: a tolerance would pass a rounding that truncates or breaks ties the wrong way
    (an error of one bf16 ulp). A 1x1 kernel of ones with a bias puts every output on a tie between
    two bf16 values, half of them rounding up (odd last bit) and half down (even); NaN, +-Inf and
    values that round to Inf are among the inputs. The 7x7 case and its input gradient check the
    general sums. Each instruction set in a child process."""
    backend_or_skip("cpu")
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    ulp = 2.0 ** -7  # of bf16 values in [1, 2)
    # x: 1 + j * ulp (j = 0..15: even and odd last bits), specials; bias: half an ulp (a tie) and 0
    base = torch.tensor([1 + j * ulp for j in range(16)])
    x = base.repeat(2, 1, 3, 4).transpose(1, 3).reshape(2, 16, 4, 3).contiguous()  # (N, C=16, 4, 3)
    x[0, 1, 1, 1], x[0, 2, 2, 1], x[1, 3, 0, 0] = float("nan"), float("inf"), -float("inf")
    x[1, 12, 3, 2] = 3.3895e38  # bf16's largest finite value: plus its channel's bias, rounds to Inf
    x = x.to(torch.bfloat16)
    bias = torch.full((16,), ulp / 2).to(torch.bfloat16)
    bias[8:] = 2.0 ** 120  # no tie in these channels (1 + 2^120 is 2^120); past bf16's largest value with it
    w1 = torch.ones(16, 1, 1, 1, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x7 = torch.randn(2, 32, 9, 11, generator=g).to(torch.bfloat16)
    w7 = torch.randn(32, 1, 7, 7, generator=g).to(torch.bfloat16)
    cases = []
    for xx, ww, bb in [(x, w1, bias), (x7, w7, torch.randn(32, generator=g).to(torch.bfloat16))]:
        grad = torch.randn(xx.shape, generator=g).to(torch.bfloat16)
        for fmt in ("channels_last", "contiguous"):  # in place; packed tiles
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            cases.append((xx.contiguous(memory_format=mf), ww, grad.contiguous(memory_format=mf), bb))
    out = cpu_kernels_on_isa(isa, cases, tmp_path)
    for case in (0, 2):
        in_place, packed = out[case], out[case + 1]
        for name, a, b in zip(PASSES[:2], in_place[:2], packed[:2]):  # forward, input gradient
            assert a.dtype == torch.bfloat16
            assert torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16)), (isa, case, name)
    y = out[0][0].float()
    want = (x.float() + bias.float()[:, None, None]).to(torch.bfloat16).float()  # PyTorch's rounding
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(torch.nan_to_num(y), torch.nan_to_num(want))
    tie = (bias.float() < 1)[:, None, None] & x.float().isfinite()
    assert (tie & (want > x.float())).any() and (tie & (want == x.float())).any()  # up and down both occur
    assert y[1, 12, 3, 2] == float("inf")


def test_cpu_bf16_pairs_sum_as_the_fp32_path(tmp_path):
    """On AVX512-BF16 the bf16 forward and weight gradient of packed tiles multiply two rows in one
    instruction (vdpbf16ps: tap rows; image rows); elsewhere, and with LKFAST_CPU_ISA=avx512, the
    same tiles take fp32 FMAs. Each sum is the same set of exact products (bf16 x bf16 fits fp32)
    added in another order, so the two fp32 sums differ by at most 2 n u sum|products| (n terms,
    u = 2^-24) and the outputs by that plus one bf16 rounding step, in a few elements only. vdpbf16ps reads
    bf16 subnormals as zero (as oneDNN's bf16 convolution does on such CPUs), which the fp32 path
    does not: a subnormal times 2^100 tells which path ran, so the comparison cannot pass by running
    the fp32 path twice. Shapes: RepLKNet's stage 1, 2 and 3 kernels on smaller maps (stage 3 the
    small-map kernels, which pair maps wider than 7), odd and one-row kernels,
    row chunks, a partial channel block, a map no taller than half the kernel, the input gradient
    (the flipped kernel) and the weight gradient (odd and even heights) included."""
    backend_or_skip("cpu")
    g = torch.Generator().manual_seed(3)
    cases = []
    for shape, k, fmt in [((2, 16, 40, 36), (31, 31), "contiguous"), ((1, 20, 28, 28), (29, 29), "channels_last"),
                          ((2, 16, 40, 9), (15, 3), "contiguous"), ((2, 6, 9, 11), (1, 15), "contiguous"),
                          ((1, 16, 5, 30), (31, 31), "contiguous"), ((2, 20, 14, 14), (27, 27), "channels_last"),
                          ((2, 16, 10, 10), (19, 19), "contiguous"), ((1, 16, 9, 11), (21, 21), "contiguous")]:
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        x, grad = (torch.randn(shape, generator=g).to(torch.bfloat16).contiguous(memory_format=mf) for _ in range(2))
        cases.append((x, torch.randn(shape[1], 1, *k, generator=g).to(torch.bfloat16), grad,
                      torch.randn(shape[1], generator=g).to(torch.bfloat16)))
    witnesses = []  # (case, pass, element): a bf16 subnormal times 2^100 there
    for size, k in ((20, 15), (10, 19)):  # the second a small map
        subnormal, big = torch.zeros(1, 16, size, size), torch.zeros(1, 16, size, size)
        subnormal[0, :, size // 2, size // 2], big[0, :, size // 2, size // 2] = 1e-39, 2.0 ** 100
        w_big = torch.zeros(16, 1, k, k)
        w_big[:, 0, k // 2, k // 2] = 2.0 ** 100
        cases.append((subnormal.to(torch.bfloat16), w_big.to(torch.bfloat16), big.to(torch.bfloat16), None))
        witnesses += [(len(cases) - 1, name, (0, 0, size // 2, size // 2) if name == "forward" else (0, 0, k // 2, k // 2))
                      for name in ("forward", "weight_grad")]
    pairs = cpu_kernels_on_isa("avx512bf16", cases, tmp_path)  # skips where the CPU has no AVX512-BF16
    fp32 = cpu_kernels_on_isa("avx512", cases, tmp_path)
    for case, name, element in witnesses:  # which path ran
        i = PASSES.index(name)
        assert pairs[case][i][element] == 0 and fp32[case][i][element] > 1e-9, (case, name)
    differ = total = 0
    for (x, w, grad, b), p, f in zip(cases[:-2], pairs, fp32):
        want = reference(x, w, b, grad)
        magnitude = reference(x.abs(), w.abs(), b.abs(), grad.abs())  # sum|products| of each output
        for name, a, c in zip(PASSES, p, f):
            terms = w[0, 0].numel() if name != "weight_grad" else x.shape[0] * x.shape[2] * x.shape[3]
            a, c = a.float(), c.float()
            bound = (torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), c.abs())
                     + 2 * terms * 2.0 ** -24 * magnitude[name].float())
            assert ((a - c).abs() <= bound).all(), (tuple(x.shape), name)
            differ, total = differ + int((a != c).sum()), total + a.numel()
            assert rel_err(p[PASSES.index(name)], want[name]) < TOLERANCE[torch.bfloat16][name]
    assert differ < 0.05 * total, (differ, total)


def test_auto_plan_on_cpu(monkeypatch):
    w = torch.randn(4, 1, 7, 7)
    x = torch.randn(1, 4, 16, 16)
    if not ops.available_backends()["cpu"].available:
        assert ops.plan_for(x, w) == ("torch", "torch", "torch")
        return
    from lkfast.ops import cpu_dispatch

    # The tests run with calibration off (conftest): the shipped table decides; where it has no row
    # for the instruction set, the built-in rule. The table's own rules are tested in
    # test_cpu_dispatch.py; here: what plan_for makes of each source.
    assert tuple(ops.plan_for(x, w)) == tuple(cpu_dispatch.choose(x, w, p).backend for p in ops.PASSES)
    monkeypatch.setattr(cpu_dispatch, "_load_table", lambda path: {})  # no table: the built-in rule
    assert ops.plan_for(x, w) == ("cpu", "cpu", "cpu")
    assert ops.plan_for(x.double(), w.double()) == ("cpu", "cpu", "cpu")
    # the half forward: oneDNN where PyTorch runs that dtype through it, else lkfast's kernel
    for uses_onednn, forward in ((True, "torch"), (False, "cpu")):
        monkeypatch.setattr(cpu_dispatch, "torch_uses_onednn", lambda dtype: uses_onednn)
        assert ops.plan_for(x.bfloat16(), w.bfloat16()) == (forward, forward, "cpu")
        assert ops.plan_for(x.half(), w.half()) == (forward, forward, "cpu")


def test_plan_explains_why_backends_were_passed_over(monkeypatch):
    backend_or_skip("cpu")
    from lkfast.ops import cpu_dispatch

    monkeypatch.setattr(cpu_dispatch, "torch_uses_onednn", lambda dtype: True)  # fp16's built-in rule: oneDNN
    x, w = torch.randn(1, 4, 16, 16).half(), torch.randn(4, 1, 7, 7).half()
    why = ops.plan_for(x, w, explain=True)
    assert isinstance(why, ops.PlanExplanation) and why.plan == Plan("torch", "torch", "cpu")
    assert "oneDNN" in why.source and "float16" in why.source
    assert why.passed_over["cpu"] == "can run this call, not chosen for forward, input_grad (see 'because')"
    assert why.passed_over["torch"] == "can run this call, not chosen for weight_grad (see 'because')"
    for name in ("cuda", "triton"):  # they cannot run CPU tensors: their own reasons, word for word
        reasons = BACKENDS[name].not_supported_reasons(x, w)
        assert why.passed_over[name] == "cannot run this call: " + "; ".join(reasons)
    assert str(why).splitlines()[0] == "plan: forward=torch, input_grad=torch, weight_grad=cpu"
    named = ops.plan_for(x.float(), w.float(), "torch", explain=True)
    assert named.plan == ("torch",) * 3 and "named" in named.source and "torch" not in named.passed_over
    assert ops.plan_for(x.float(), w.float(), explain=True).plan == ops.plan_for(x.float(), w.float())


def test_plan_travels_through_the_op_schema_as_one_string():
    plan = Plan("torch", "cpu", "triton")
    assert Plan.decode(plan.encode()) == plan and isinstance(plan.encode(), str)
    assert PASSES == ("forward", "input_grad", "weight_grad")


def test_the_output_layout_follows_the_channel_stride():
    """output_memory_format: contiguous in, contiguous out; channels_last in, channels_last out; a
    strided view whose channels are adjacent in memory (a channels_last map sliced along W) is
    computed and returned channels_last, a strided NCHW view contiguous."""
    from lkfast.ops.backends import output_memory_format

    x = torch.randn(2, 8, 6, 10)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert output_memory_format(x) == torch.contiguous_format
    assert output_memory_format(nhwc) == torch.channels_last
    assert output_memory_format(nhwc[..., ::2]) == torch.channels_last
    assert output_memory_format(x[..., ::2]) == torch.contiguous_format


def test_the_choice_memo_is_bounded():
    """backends.remembered (the per-call memo of auto's choices) starts over past 4096 keys, so
    many distinct shapes (varying image sizes) do not grow it without bound."""
    from lkfast.ops.backends import remembered

    memo = {}
    for i in range(5000):
        assert remembered(memo, i, "source", lambda i=i: i * 2) == i * 2
        assert len(memo) <= 4096
    assert remembered(memo, 4999, "source", lambda: "not asked") == 4999 * 2


def test_available_backends_explains():
    """What available_backends() says matches what a named call does: an available backend runs a
    call on its device and matches the reference; an unavailable one refuses, with that reason."""
    info = ops.available_backends()
    assert list(info) == list(BACKENDS)
    assert info["torch"].available
    assert info["cuda"].available <= torch.cuda.is_available()
    x, w = torch.randn(1, 3, 6, 6), torch.randn(3, 1, 3, 3)
    for name, entry in info.items():
        backend = BACKENDS[name]
        assert entry.dtypes == tuple(dtype_name(d) for d in backend.dtypes)
        assert str(entry).split()[:2] == [name, "available" if entry.available else "unavailable"]
        device = "cuda" if "cuda" in backend.device_types and torch.cuda.is_available() else backend.device_types[0]
        if entry.available and (device == "cpu" or torch.cuda.is_available()):
            # in a dtype the backend takes (triton_mma: fp16/bf16 only), rounded the same for the reference
            dtype = torch.float32 if torch.float32 in backend.dtypes else backend.dtypes[0]
            xr, wr = x.to(dtype).float(), w.to(dtype).float()
            y = ops.depthwise_conv2d(xr.to(device, dtype), wr.to(device, dtype), backend=name)
            assert y.dtype == dtype, name
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert rel_err(y.cpu().float(), reference(xr, wr, None, torch.zeros_like(xr))["forward"]) < tol, name
        elif not entry.available:
            with pytest.raises(RuntimeError, match="cannot run this call") as error:
                ops.depthwise_conv2d(x, w, backend=name)
            assert entry.reason in str(error.value), name
    if info["cpu"].available:
        from lkfast import _ext

        note = _ext._C.cpu_isa_note()  # a build that left out a path this CPU has says which
        assert info["cpu"].reason.endswith(f", {_ext._C.cpu_isa()} path" + (f" ({note})" if note else ""))
        assert _ext._C.cpu_isa() in ("generic", "avx2", "avx512", "avx512bf16")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES, ids=case_id)
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_registered_ops(backend_device, fmt):
    backend, device = backend_device
    backend = backend_or_skip(backend, device)
    x = make_input((2, 4, 9, 8), fmt, device=device).requires_grad_(True)
    w = torch.randn(4, 1, 5, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    g = make_input((2, 4, 9, 8), fmt, device=device)
    for plan in {Plan.single(backend).encode(), ops.plan_for(x, w).encode(), "auto"}:  # "auto": chosen by the op
        torch.library.opcheck(torch.ops.lkfast.depthwise_conv2d.default, (x, w, b, plan))
    for name in (backend, "auto"):
        torch.library.opcheck(torch.ops.lkfast.depthwise_conv2d_input_grad.default, (g, w.detach(), name))
        torch.library.opcheck(torch.ops.lkfast.depthwise_conv2d_weight_grad.default, (g, x.detach(), 5, 3, name))


def _depthwise_case(fmt, device, dtype=torch.float64):
    """x, weight, bias (leaves requiring grad) and an output gradient: a small case with a
    rectangular kernel, in layout ``fmt``."""
    x = make_input((2, 5, 9, 8), fmt, dtype, device).requires_grad_(True)
    w = make_weight(5, 5, 3, dtype, device).requires_grad_(True)
    b = torch.randn(5, dtype=dtype, device=device).requires_grad_(True)
    return x, w, b, make_input((2, 5, 9, 8), fmt, dtype, device)


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the eager path called the registered op {name}")
    return refuse


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES + [("auto", "cpu"), ("auto", "cuda")], ids=case_id)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_the_eager_path_skips_the_registered_op_and_equals_it(backend_device, fmt, monkeypatch):
    """A plain eager call runs the backends through _Eager, never the registered ops (their
    dispatch is host time), and gives bit for bit what the registered op gives: output, the three
    gradients, and the second-order gradients of a gradient penalty."""
    from lkfast.ops import depthwise

    backend, device = backend_device
    backend = backend_or_skip(backend, device, torch.float64 if backend not in ("triton",) else torch.float32)
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, w, b, g = _depthwise_case(fmt, device, dtype)

    def run():
        y = ops.depthwise_conv2d(x, w, b, backend=backend)
        first = torch.autograd.grad(y, (x, w, b), g)
        y = ops.depthwise_conv2d(x, w, b, backend=backend)
        gx, gw, _ = torch.autograd.grad(y, (x, w, b), g, create_graph=True)
        second = torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w))
        return (y.detach(),) + first + second

    with monkeypatch.context() as m:
        for name in ("_depthwise_conv2d_op", "_input_grad_op", "_weight_grad_op"):
            m.setattr(depthwise, name, _refuse(name))
        eager = run()
    monkeypatch.setattr(depthwise, "_eager", lambda *args: False)
    registered = run()
    for i, (a, r) in enumerate(zip(eager, registered)):
        assert torch.equal(a, r), i
    assert eager[0].is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else
                                  torch.contiguous_format)


def test_a_call_autograd_does_not_record_skips_the_autograd_function(monkeypatch):
    """Under no_grad, inference_mode, or with no tensor requiring a gradient, an eager call runs the
    forward backend directly (no _Eager.apply: its host time buys nothing there), with the same
    output; a call autograd records still goes through _Eager and differentiates."""
    from lkfast.ops import depthwise

    x, w, b = torch.randn(2, 8, 12, 12), torch.randn(8, 1, 7, 7), torch.randn(8)
    expected = ops.depthwise_conv2d(x, w, b, backend="torch")
    entered = []
    real_apply = depthwise._Eager.apply
    monkeypatch.setattr(depthwise._Eager, "apply", lambda *args: entered.append(1) or real_apply(*args))
    with torch.no_grad():
        y = ops.depthwise_conv2d(x.requires_grad_(), w, b)
    x.requires_grad_(False)
    with torch.inference_mode():
        y_inf = ops.depthwise_conv2d(x, w, b)
    y_plain = ops.depthwise_conv2d(x, w, b)  # grad mode on, nothing requires a gradient
    assert not entered
    for out in (y, y_inf, y_plain):
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_()
    y_grad = ops.depthwise_conv2d(x, wg, b)
    assert entered and y_grad.grad_fn is not None
    y_grad.sum().backward()
    assert wg.grad is not None and wg.grad.shape == w.shape


class _Subclass(torch.Tensor):
    pass


def _flop_counter_sees_the_op(x, w, b, g):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        ops.depthwise_conv2d(x, w, b).backward(g)
    N, C, H, W = x.shape
    assert counter.get_total_flops() == 3 * 2 * N * C * H * W * w.shape[2] * w.shape[3]


def _jit_trace_records_the_op(x, w, b, g):
    w, b = w.detach(), b.detach()
    traced = torch.jit.trace(lambda a: ops.depthwise_conv2d(a, w, b), x.detach())
    assert "lkfast::depthwise_conv2d" in str(traced.graph)
    other = torch.randn_like(x.detach())  # a traced call of another input computes on it
    assert torch.equal(traced(other), ops.depthwise_conv2d(other, w, b))


def _profiler_names_the_ops(x, w, b, g):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.depthwise_conv2d(x, w, b).backward(g)
    names = {event.name for event in prof.events()}
    assert {"lkfast::depthwise_conv2d", "lkfast::depthwise_conv2d_input_grad",
            "lkfast::depthwise_conv2d_weight_grad"} <= names


def _torch_function_mode_sees_the_op(x, w, b, g):
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        y = ops.depthwise_conv2d(x, w, b)
    assert torch.ops.lkfast.depthwise_conv2d.default in Record.seen
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, b, padding=(2, 1), groups=5))


def _subclass_takes_the_op(x, w, b, g):
    from lkfast.ops import depthwise

    assert depthwise._eager(x, torch.nn.Parameter(w.detach()), b)  # a Parameter is a plain tensor here
    for args in ((x.as_subclass(_Subclass), w, b), (x, w.as_subclass(_Subclass), b), (x, w, b.as_subclass(_Subclass))):
        assert not depthwise._eager(*args)


@pytest.mark.parametrize("check", [_flop_counter_sees_the_op, _jit_trace_records_the_op, _profiler_names_the_ops,
                                   _torch_function_mode_sees_the_op, _subclass_takes_the_op],
                         ids=lambda f: f.__name__.strip("_"))
def test_what_must_see_the_registered_op_gets_it(check):
    """FlopCounterMode (lkfast.eval's multiply-add count), torch.jit.trace, the profiler, a
    TorchFunctionMode and tensor subclasses see the registered ops, not the eager path's
    autograd.Function, which none of them could see into (torch.compile: the compile tests)."""
    x, w, b, g = _depthwise_case("contiguous", "cpu", torch.float32)
    check(x, w, b, g)


class _Block(torch.nn.Module):
    def __init__(self, channels=8, k=7):
        # Each test compiles a new _Block: dynamo guards on the parameters, so compiled entries of
        # forward pile up across tests until its recompile limit (8) fails a fullgraph compile,
        # depending on which compile tests ran before (-k compile did). Start each from none.
        torch._dynamo.reset()
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels, 1, k, k) / k)
        self.bias = torch.nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return torch.relu(ops.depthwise_conv2d(x, self.weight, self.bias)) + x


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile(compile_backend):
    module = _Block()
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    compiled = torch.compile(module, backend=compile_backend, fullgraph=True)
    y = compiled(x)
    y_eager = module(x)
    assert torch.allclose(y, y_eager, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    gx, gw = x.grad.clone(), module.weight.grad.clone()
    x.grad = None
    module.weight.grad = None
    y_eager.sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(gw, module.weight.grad, atol=1e-4, rtol=1e-4)


def test_torch_compile_shapes_vary():
    """One compiled function, called at several batch and image sizes (dynamo recompiles with
    symbolic shapes after the first change) and compiled with dynamic=True: values and gradients
    equal eager mode's at each size."""
    module = _Block()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    dynamic = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(2, 8, 12, 12), (3, 8, 12, 12), (1, 8, 9, 13), (4, 8, 16, 10)]:
        for fn in (compiled, dynamic):
            x = torch.randn(shape, requires_grad=True)
            y = fn(x)
            gx, gw = torch.autograd.grad(y.square().sum(), (x, module.weight))
            y_eager = module(x)
            gx_eager, gw_eager = torch.autograd.grad(y_eager.square().sum(), (x, module.weight))
            assert torch.allclose(y, y_eager, atol=1e-5, rtol=1e-5), shape
            assert torch.allclose(gx, gx_eager, atol=1e-4, rtol=1e-4), shape
            assert torch.allclose(gw, gw_eager, atol=1e-4, rtol=1e-4), shape


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_a_named_backend_under_torch_compile_runs_every_pass(name, monkeypatch):
    """A backend named by the caller is used for all three passes under torch.compile as in eager
    mode; it is not left to auto's choice at run time (which is only for backend="auto")."""
    backend_or_skip(name)
    ran = []
    for other in ("torch", "cpu"):
        be = BACKENDS[other]
        monkeypatch.setattr(be, "forward", lambda *a, _f=be.forward, _n=other: ran.append(_n) or _f(*a))
        monkeypatch.setattr(be, "weight_grad", lambda *a, _f=be.weight_grad, _n=other: ran.append(_n) or _f(*a))
    import lkfast.ops.depthwise as depthwise

    monkeypatch.setattr(depthwise, "_plan_for", lambda x, w, backend="auto", **kw: Plan.single(
        "torch" if name == "cpu" else "cpu") if backend == "auto" else Plan.single(backend))  # auto would pick the other
    weight = torch.randn(8, 1, 7, 5, requires_grad=True)
    compiled = torch.compile(lambda x: ops.depthwise_conv2d(x, weight, backend=name), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    assert ran == [name] * 3, ran
    assert rel_err(y.detach(), reference(x.detach(), weight.detach(), None, torch.zeros_like(x))["forward"]) < 1e-5


def test_compiled_auto_plan_is_chosen_per_call_from_the_real_tensors(monkeypatch):
    """Under torch.compile, auto's plan is chosen when the op runs, from the tensors it runs on, as
    in eager mode; not once at trace time for every later shape. A stand-in plan_for sends batch 2
    to one backend and batch 3 to another, per pass; one dynamic graph must follow it call by call.
    The plans set every two passes apart somewhere (batch 2: the input gradient apart from the
    other two; batch 3: the weight gradient apart from the other two), so a pass that took another
    pass's backend fails; the kernel is 7x5, so a weight-gradient op asking about 5x7 fails too."""
    import lkfast.ops.depthwise as depthwise

    plans = {2: Plan("torch", "cpu", "torch"), 3: Plan("cpu", "cpu", "torch")}
    real_plan_for = depthwise._plan_for
    asked = []

    def plan_for(x, weight, backend="auto", **kwargs):
        if backend != "auto":
            return real_plan_for(x, weight, backend, **kwargs)
        asked.append((x.shape[0], tuple(weight.shape), torch.compiler.is_compiling()))
        return plans[x.shape[0]]

    ran = []
    for name in ("torch", "cpu"):
        be = BACKENDS[name]
        monkeypatch.setattr(be, "forward", lambda *a, _f=be.forward, _n=name: ran.append((_n, "flip" if a[3] else "fwd")) or _f(*a))
        monkeypatch.setattr(be, "weight_grad", lambda *a, _f=be.weight_grad, _n=name: ran.append((_n, "wgrad")) or _f(*a))
    monkeypatch.setattr(depthwise, "_plan_for", plan_for)
    if not depthwise._usable("cpu", torch.randn(2, 8, 12, 12), torch.randn(8, 1, 7, 7)):
        pytest.skip("lkfast's CPU kernels cannot run here")
    module = _Block()
    module.weight = torch.nn.Parameter(torch.randn(8, 1, 7, 5) / 7)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (2, 3, 2):
        ran.clear()
        asked.clear()
        x = torch.randn(n, 8, 12, 12, requires_grad=True)
        compiled(x).sum().backward()
        fwd, igrad, wgrad = plans[n]
        assert ran == [(fwd, "fwd"), (igrad, "flip"), (wgrad, "wgrad")], (n, ran)
        assert asked and all(a == (n, (8, 1, 7, 5), False) for a in asked), asked  # when the op runs, not in a trace


# ---- bad input: each error names the problem -------------------------------------------------

def _args():
    return torch.randn(2, 4, 8, 8), torch.randn(4, 1, 7, 7)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, w: (x[0], w, None), ValueError, r"x must be 4-D"),
        (lambda x, w: (x, w[:3], None), ValueError, r"channel mismatch: x has C = 4 .* 3 kernels"),
        (lambda x, w: (x, torch.randn(4, 1, 6, 7), None), ValueError, r"must be odd .* 6x7"),
        (lambda x, w: (x, torch.randn(4, 1, 7, 6), None), ValueError, r"must be odd .* 7x6"),
        (lambda x, w: (x, torch.randn(4, 2, 7, 7), None), ValueError, r"weight must be \(C, 1, kh, kw\)"),
        (lambda x, w: (x, torch.randn(4, 7, 7), None), ValueError, r"weight must be \(C, 1, kh, kw\)"),
        (lambda x, w: (x, w.double(), None), TypeError, r"dtype mismatch: x is float32 but weight is float64"),
        (lambda x, w: (x.int(), w.int(), None), TypeError,
         r"unsupported dtype int32 for x; use one of float32, float16, bfloat16, float64$"),
        (lambda x, w: (x, w, torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
        (lambda x, w: (x, w.to("meta"), None), ValueError, r"device mismatch"),
        (lambda x, w: (x, w, [0.0] * 4), TypeError, r"bias must be a tensor or None, got list"),
        (lambda x, w: (x, w, torch.randn(4).double()), TypeError, r"dtype mismatch: x is float32 but bias is float64"),
        (lambda x, w: (x, w, torch.randn(4, device="meta")), ValueError, r"device mismatch: x is on cpu but bias is on meta"),
    ],
)
def test_bad_input_errors(make, exc, match):
    x, w = _args()
    with pytest.raises(exc, match=match):
        ops.depthwise_conv2d(*make(x, w))
    x_bad, w_bad, bias = make(x, w)
    if bias is None:  # plan_for says what the op says (it said "lkfast cpu: odd kernel sizes only" for 6x7)
        with pytest.raises(exc, match=match):
            ops.plan_for(x_bad, w_bad)


# ---- empty input: an empty output and zero weight/bias gradients, on every backend ------------

EMPTY_SHAPES = [(0, 3, 6, 5), (2, 0, 6, 5), (2, 3, 0, 5), (2, 3, 6, 0)]


@pytest.mark.parametrize("backend_device", [("auto", "cpu")] + BACKEND_DEVICES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=case_id)
def test_empty_input(backend_device, dtype, shape):
    # F.conv2d refuses C = 0 and an empty map; the "torch" backend ran it anyway (and so did
    # `auto`, wherever its plan named torch: the fp16 forward, or a calibration that timed it)
    name, device = backend_device
    backend = backend_or_skip(name, device, dtype)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    w = torch.randn(shape[1], 1, 7, 3, device=device).to(dtype).requires_grad_(True)
    b = torch.randn(shape[1], device=device).to(dtype).requires_grad_(True)
    y = ops.depthwise_conv2d(x, w, b, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    assert not w.grad.any() and not b.grad.any()


def test_an_empty_input_is_not_calibrated(tmp_path, monkeypatch):
    # An empty dimension buckets as 1 (cpu_dispatch.shape_class): a calibration timed on the empty
    # tensors was kept as the choice for every batch-1 call of that shape class.
    from lkfast.ops import cpu_dispatch

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    monkeypatch.setattr(cpu_dispatch, "_calibration", None)
    measured = []
    monkeypatch.setattr(cpu_dispatch, "measure", lambda runs: measured.append(sorted(runs)) or {n: 1.0 for n in runs})
    x = torch.randn(0, 8, 12, 12, requires_grad=True)
    w = torch.randn(8, 1, 7, 7, requires_grad=True)
    ops.depthwise_conv2d(x, w).sum().backward()
    assert ops.plan_for(x, w) == ("torch", "torch", "torch")
    assert "empty" in ops.plan_for(x, w, explain=True).source
    assert measured == [] and not list(tmp_path.iterdir())


_ONE_CHANNEL_CHILD = """
import sys, torch
import lkfast.ops as ops
from lkfast.ops.backends import BACKENDS
torch.set_num_threads(1)
for shape, (kh, kw) in [((1, 1, 13, 23), (31, 13)), ((2, 1, 14, 14), (51, 7)), ((1, 1, 10, 23), (31, 13))]:
    x, g = torch.randn(shape), torch.randn(shape)
    for _ in range(3):
        gw = BACKENDS["torch"].weight_grad(g, x, kh, kw)
    want = torch.nn.grad.conv2d_weight(x.double(), (1, 1, kh, kw), g.double(), padding=(kh // 2, kw // 2))
    assert gw.shape == (1, 1, kh, kw) and ((gw.double() - want).abs().max() / want.abs().max()).item() < 1e-4
    # auto with calibration on (the default) times the torch weight gradient on tensors of this shape
    x.requires_grad_(True)
    ops.depthwise_conv2d(x, torch.randn(1, 1, kh, kw, requires_grad=True)).sum().backward()
    # a gradient penalty (create_graph=True) computes the weight gradient through PyTorch's
    # differentiable convolution_backward: the same one-channel weight gradient
    for fmt in (torch.contiguous_format, torch.channels_last):
        xd = x.detach().contiguous(memory_format=fmt).requires_grad_(True)
        wd = torch.randn(1, 1, kh, kw, requires_grad=True)
        def grads(conv):
            gx, gw = torch.autograd.grad(conv(xd, wd).square().sum(), (xd, wd), create_graph=True)
            return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (xd, wd))
        got = grads(ops.depthwise_conv2d)
        want = grads(lambda a, b: torch.nn.functional.conv2d(a.expand(-1, 2, -1, -1), b.expand(2, -1, -1, -1),
                                                             padding=(kh // 2, kw // 2), groups=2)[:, :1])
        assert all(((a - b).abs().max() / b.abs().max()).item() < 1e-4 for a, b in zip(got, want))
    # under torch.func, auto and torch compute with F.conv2d: on one channel the same oneDNN weight
    # gradient (grad, jacrev, vmap of grad, grad of grad), against F.conv2d in float64 (not oneDNN's)
    func, xf, b = torch.func, x.detach(), torch.randn(1)
    ws = torch.randn(3, 1, 1, kh, kw)
    plain = lambda a, w: torch.nn.functional.conv2d(a.double(), w.double(), b.double(), padding=(kh // 2, kw // 2))
    for backend in ("auto", "torch"):
        conv = lambda a, w: ops.depthwise_conv2d(a, w, b, backend=backend)
        for name, transform in {
            "grad": lambda f: func.grad(lambda w: f(xf, w).square().sum())(ws[0]),
            "vmap of grad": lambda f: func.vmap(func.grad(lambda w: f(xf, w).square().sum()))(ws),
            "grad of grad": lambda f: func.grad(lambda a, w: func.grad(lambda w: f(a, w).pow(3).sum())(w).square().sum(),
                                                argnums=(0, 1))(xf, ws[0]),
        }.items():
            got, want = transform(conv), transform(plain)
            for a, c in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert ((a.double() - c).abs().max() / c.abs().max()).item() < 1e-4, (backend, name, shape)
print("ok")
"""


def test_one_channel_weight_grad_on_the_cpu_does_not_crash(tmp_path):
    """oneDNN's weight gradient of a one-channel convolution whose kernel reaches far past the map's
    rows corrupts the heap (torch 2.14); the "torch" backend, the calibration of ``auto`` that times
    it, and ``auto``/``torch`` under torch.func transforms (F.conv2d with groups = 1) computed it
    there and crashed the process. In a child process: a crash is a failure."""
    env = {**os.environ, "LKFAST_CALIBRATE": "1", "LKFAST_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _ONE_CHANNEL_CHILD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


def test_cpu_weight_grad_keeps_no_sums_from_the_call_before():
    """The CPU weight gradient sums per-group partial results in a buffer its calling thread keeps
    from call to call; every call must zero all of it, the rows of an image group left empty too.
    With 2 threads and one channel block the images go in 4 groups of ceil(N / 4): N = 5 leaves the
    fourth empty, after a call with N = 8 filled it."""
    backend_or_skip("cpu")
    from lkfast import _ext

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (8, 5, 8, 5):
            x, g = torch.randn(n, 16, 9, 9), torch.randn(n, 16, 9, 9)
            want = reference(x, make_weight(16, 7, 7), None, g)["weight_grad"]
            assert rel_err(_ext._C.cpu_weight_grad(g, x, 7, 7), want) < TOLERANCE[torch.float32]["weight_grad"], n
    finally:
        torch.set_num_threads(threads)


def test_unknown_backend_lists_choices():
    x, w = _args()
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*auto, torch, cpu, cuda, triton"):
        ops.depthwise_conv2d(x, w, backend="fast")


def test_unusable_backend_says_why():
    x, w = _args()
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call .*Backends that can: .*torch"):
        ops.depthwise_conv2d(x, w, backend="cuda")


def test_torch_func_transforms_compute_with_conv2d(tmp_path, monkeypatch):
    """vmap (over inputs and over per-model weights), jvp, jacrev and a second derivative through
    the op equal the same transforms of F.conv2d; with calibration on, nothing is measured inside a
    transform (vmap refuses the random timing tensors). A named lkfast kernel says it cannot run."""
    import torch.nn.functional as F

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    w = torch.randn(4, 1, 5, 3, dtype=torch.float64)  # rectangular: padding (2, 1), not (1, 2)
    b = torch.randn(4, dtype=torch.float64)

    def fast(x, w):
        return ops.depthwise_conv2d(x, w, b)

    def plain(x, w):
        return F.conv2d(x, w, b, padding=(2, 1), groups=4)

    func = torch.func
    for name, transform in func_transforms(x, w).items():
        torch.testing.assert_close(transform(fast), transform(plain), rtol=1e-10, atol=1e-10, msg=name)
    assert list(tmp_path.iterdir()) == []  # no calibration file: nothing measured under a transform
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run under torch.func transforms.*'auto' or 'torch'"):
        func.vmap(lambda x: ops.depthwise_conv2d(x, w, backend="cpu"))(x.unsqueeze(1))


def test_forward_mode_dual_tensors_keep_their_tangents():
    """torch.autograd.forward_ad's dual tensors (a tangent on x, on the weight, on the bias, and
    jacobian(strategy="forward-mode")): the op computes with F.conv2d, whose tangents it returns; the
    custom op alone would drop them (a None tangent, a zero Jacobian). A named kernel says it cannot."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    w = torch.randn(3, 1, 5, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    plain = lambda x, w, b: F.conv2d(x, w, b, padding=(2, 1), groups=3)  # noqa: E731
    for duals in ("x", "w", "b", "xwb"):
        with fwAD.dual_level():
            args = [fwAD.make_dual(v, t) if name in duals else v for name, v, t in (("x", x, tx), ("w", w, tw),
                                                                                 ("b", b, tb))]
            fast = fwAD.unpack_dual(ops.depthwise_conv2d(*args))
            reference = fwAD.unpack_dual(plain(*args))
        torch.testing.assert_close(fast.primal, reference.primal, msg=duals)
        assert fast.tangent is not None, duals
        torch.testing.assert_close(fast.tangent, reference.tangent, rtol=1e-10, atol=1e-10, msg=duals)
    small = x[:1, :, :4, :4]
    jacobian = torch.autograd.functional.jacobian(lambda x: ops.depthwise_conv2d(x, w), small, vectorize=True,
                                                  strategy="forward-mode")
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(lambda x: plain(x, w, None), small))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="backend 'cpu' cannot run .* forward-mode dual tensors"):
        ops.depthwise_conv2d(fwAD.make_dual(x, tx), w, backend="cpu")


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_op_follows_autocast_whichever_backend_computes(channels_last, monkeypatch):
    """Under CPU autocast the op's inputs are cast as F.conv2d's are (floating, not float64, to the
    autocast dtype), on every backend: the output is bfloat16 from the C++ kernels and from
    PyTorch's alike, and the backward runs (it crashed where the torch backend returned bfloat16
    of float32 inputs). float64 and integers are left as they are, as autocast leaves them."""
    pytest.importorskip("lkfast._C")
    import torch.nn.functional as F

    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for backend in ("cpu", "torch", "auto"):
        x = torch.randn(2, 3, 8, 8).contiguous(memory_format=fmt).requires_grad_()
        w = torch.randn(3, 1, 5, 5, requires_grad=True)
        b = torch.randn(3, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ops.depthwise_conv2d(x, w, b, backend=backend)
            reference = F.conv2d(x, w, b, padding=2, groups=3)
        assert y.dtype == reference.dtype == torch.bfloat16, backend
        torch.testing.assert_close(y.float(), reference.float(), rtol=2e-2, atol=5e-2, msg=backend)
        y.float().square().sum().backward()
        assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
        assert x.grad.isfinite().all() and w.grad.abs().sum() > 0, backend
    xd, wd = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(3, 1, 5, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yd = ops.depthwise_conv2d(xd, wd)
        with pytest.raises(TypeError, match="unsupported dtype int64 for x"):
            ops.depthwise_conv2d(torch.ones(1, 3, 8, 8, dtype=torch.long), torch.randn(3, 1, 5, 5))
    assert yd.dtype == torch.float64
    torch.testing.assert_close(yd, F.conv2d(xd, wd, padding=2, groups=3), rtol=1e-12, atol=1e-12)


_ONEDNN_HANG_CHILD = """
import sys, torch
import torch.nn.functional as F
import lkfast.ops as ops
x = torch.randn(1, 16, 32, 32).bfloat16().contiguous(memory_format=torch.channels_last)
w = torch.randn(16, 1, 15, 15).bfloat16()
g = torch.randn(1, 16, 32, 32).bfloat16()
y = ops.depthwise_conv2d(x, w, backend="torch")
ref = F.conv2d(x.float(), w.float(), padding=7, groups=16)
assert y.is_contiguous(memory_format=torch.channels_last)
assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
xg = x.detach().requires_grad_()
ops.depthwise_conv2d(xg, w, backend="torch").backward(g)  # the input gradient: a forward too
print("done")
"""


def test_the_torch_backend_keeps_out_of_onednns_bf16_forward_that_does_not_return(monkeypatch):
    """oneDNN's bf16 channels_last depthwise forward never returned for 2-16 channels and kernels 15+
    wide on this project's Zen 5 (AVX512-BF16): the torch backend (and so auto's first, calibrating
    call, which times it) hung there. Those forwards run in NCHW. Where the CPU has no AVX512-BF16
    oneDNN does not hang, and the child below passes either way; the layout check runs everywhere."""
    import torch.nn.functional as F

    from lkfast.ops.backends import TorchBackend

    hangs = TorchBackend.forward_hangs_in_channels_last
    x16 = torch.zeros(1, 16, 32, 32, dtype=torch.bfloat16)
    assert hangs(x16, 15) and hangs(x16[:, :2], 51)
    assert not hangs(x16, 13) and not hangs(x16[:, :1], 31) and not hangs(torch.zeros(1, 17, 8, 8, dtype=torch.bfloat16), 31)
    assert not hangs(x16.float(), 31) and not hangs(x16.half(), 31)
    seen = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, *a, **k: seen.append(x.is_contiguous()) or real(x, *a, **k))
    cl = x16.contiguous(memory_format=torch.channels_last)
    for x, kw, nchw in ((cl, 15, True), (cl, 13, False), (cl.float(), 15, False)):
        seen.clear()
        BACKENDS["torch"].forward(x, torch.zeros(16, 1, 3, kw, dtype=x.dtype))
        assert seen == [nchw], (x.dtype, kw)
    try:
        done = subprocess.run([sys.executable, "-c", _ONEDNN_HANG_CHILD], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the torch backend's bf16 forward of x (1, 16, 32, 32) with a 15x15 kernel did not return in 180 s")
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]

"""Triton backend (lkfast.kernels) against torch.nn.functional.conv2d: forward, input gradient and
weight gradient; and the fused frequency-noise add/clamp kernel.

With a CUDA device the kernels run on it (the ``gpu`` tests add fp16/bf16 and RepLKNet-sized kernels).
Without one they run on the CPU under TRITON_INTERPRET=1, which must be set before triton is
imported: ``test_triton_kernels_in_interpreter`` reruns this file in a subprocess with it set, so the
rest of the suite keeps its normal triton. Interpreter shapes are tiny; the interpreter is slow.
"""

import pytest
import torch
import torch.nn.functional as F

from reference import (compile_for_sm90, HAS_CUDA, TRITON_DEVICE, TRITON_INTERPRETED, TRITON_RUNS_HERE, run_module_in_triton_interpreter,
                       triton_runs_here, FORMATS, GPU_SHAPES, TOLERANCE, assert_nonfinite_superset, backend_or_skip, case_id,
                       check_op, exact_reference, make_case, nonfinite_reach, run_op)

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

INTERPRETED, HAS_CUDA, RUN_HERE, DEVICE = TRITON_INTERPRETED, HAS_CUDA, TRITON_RUNS_HERE, TRITON_DEVICE
runs_here = triton_runs_here("test_triton_kernels_in_interpreter")


def test_triton_kernels_in_interpreter():
    run_module_in_triton_interpreter(__file__, timeout=900)


def _check_op(shape, fmt, dtype, with_bias=True, device=DEVICE):
    check_op(backend_or_skip("triton", device, dtype), shape, fmt, dtype, device, bias=with_bias)


# (N, C, H, W, kh, kw): tiny, for the interpreter
INTERP_SHAPES = [
    (2, 3, 9, 11, 5, 5),
    (1, 2, 6, 5, 13, 13),   # map smaller than the kernel: padding skipped
    (2, 3, 10, 7, 7, 3),    # rectangular
    (1, 3, 5, 9, 1, 9),
]


@runs_here
@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=case_id)
def test_triton_matches_conv2d(shape):
    _check_op(shape, "contiguous", torch.float32)


@runs_here
@pytest.mark.parametrize("fmt", ["channels_last", "strided"])
def test_triton_memory_formats(fmt):
    _check_op((2, 5, 7, 9, 5, 3), fmt, torch.float32)


@runs_here
def test_triton_half_precision_no_bias():
    _check_op((1, 4, 6, 7, 3, 5), "contiguous", torch.float16, with_bias=False)


# Inf and NaN (the C++ kernels' twin: tests/test_cpu_nonfinite.py). The kernels multiply padding
# loaded as 0.0 with the weights (forward, input gradient) and zero-filled positions with the input
# or output gradient (weight gradient), which is NaN against an Inf or NaN: their NaN are a superset
# of the exact sum's, like PyTorch's own paths. (Making them exact by recomputing a tile that came
# out NaN was tried, b47348a: in the GPU machine's Triton 3.6 it made two kernels use stack, 24 and
# 8 bytes per thread, so it was taken out until it can be timed on a GPU.)
NONFINITE_CASES = [
    ((1, 3, 5, 5, 7, 7), "contiguous", torch.float32),     # map narrower than the kernel
    ((1, 3, 5, 5, 7, 7), "channels_last", torch.float16),  # the channels_last forward
    ((1, 2, 9, 9, 3, 3), "channels_last", torch.float32),  # tiles past the map's edge
    ((1, 2, 9, 9, 3, 3), "contiguous", torch.float16),
]


@runs_here
@pytest.mark.parametrize("shape,fmt,dtype", NONFINITE_CASES,
                         ids=[f"{case_id(c[0])}-{c[1]}-{str(c[2])[6:]}" for c in NONFINITE_CASES])
def test_triton_nonfinite_is_a_superset_of_the_exact_masks(shape, fmt, dtype):
    """NaN, +Inf and -Inf planted in the input, the output gradient, the weight, and all three: in
    the forward, input gradient and weight gradient every NaN and Inf of the sum over in-image terms
    is kept (an Inf may become NaN), extra NaN only in the planes (channels) a non-finite operand
    reaches, finite outputs within the usual tolerance."""
    backend = backend_or_skip("triton", DEVICE, dtype)
    for where in ("input", "grad_out", "weight", "all"):
        x, weight, grad_out = make_case(shape, fmt, dtype, where, DEVICE)
        got = run_op(x, weight, None, grad_out, backend)
        want, reach = exact_reference(x, weight, grad_out), nonfinite_reach(x, weight, grad_out)
        for name in ("forward", "input_grad", "weight_grad"):
            assert_nonfinite_superset(got[name], want[name], TOLERANCE[dtype][name],
                                      f"{shape} {fmt} {dtype} {where} {name}", reach[name])


@runs_here
def test_triton_flip_is_rotated_kernel():
    from lkfast.kernels import depthwise

    x = torch.randn(1, 2, 7, 6, device=DEVICE)
    w = torch.randn(2, 1, 5, 3, device=DEVICE)
    y = depthwise.forward(x, w, None, True)
    ref = F.conv2d(x, w.flip(-1, -2), padding=(2, 1), groups=2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@runs_here
def test_triton_launches_under_the_tensors_device_guard(monkeypatch):
    """Every launch runs inside on_device(x) (torch.cuda.device(x.device) for a GPU tensor)."""
    from lkfast.kernels import depthwise

    guarded = []
    real = depthwise.on_device
    monkeypatch.setattr(depthwise, "on_device", lambda t: guarded.append(t.device) or real(t))
    x = torch.randn(1, 2, 7, 6, device=DEVICE)
    w = torch.randn(2, 1, 5, 3, device=DEVICE)
    depthwise.forward(x.contiguous(memory_format=torch.channels_last), w)
    depthwise.forward(x, w)
    depthwise.weight_grad(x, x, 5, 3)
    assert guarded == [x.device] * 3


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's own check: runs in the TRITON_INTERPRET=1 subprocess")
def test_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch):
    """A Triton/NumPy pair whose interpreter fails (Triton 3.6.0 with NumPy 2.5.2) or miscounts makes
    the backend unavailable with the reason, instead of failing every call."""
    from lkfast.kernels import depthwise as kernels

    assert kernels.unavailable_reason() is None  # this subprocess only runs where the probe passed

    def launch_that(effect):
        class Kernel:
            def __getitem__(self, grid):
                return effect
        return Kernel()

    def fails(out, n):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    def miscounts(out, n):
        out.fill_(3.0)

    try:
        for effect, expected in ((fails, "cannot run these kernels with NumPy"), (miscounts, "miscounted a loop")):
            kernels._interpreter_problem.cache_clear()
            monkeypatch.setattr(kernels, "_interpreter_probe", launch_that(effect))
            reason = kernels.unavailable_reason()
            assert reason is not None and expected in reason, reason
        from lkfast.ops.backends import BACKENDS

        assert kernels.unavailable_reason() in BACKENDS["triton"].not_supported_reasons(*_tiny())
    finally:
        monkeypatch.undo()
        kernels._interpreter_problem.cache_clear()
    assert kernels.unavailable_reason() is None


def _tiny():
    return torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_on_the_second_gpu():
    with torch.cuda.device(0):
        _check_op((2, 8, 12, 11, 7, 5), "contiguous", torch.float32, device="cuda:1")
        _check_op((2, 8, 12, 11, 7, 5), "channels_last", torch.float16, device="cuda:1")


@runs_here
def test_add_clamp_kernel():
    from lkfast.kernels.frequency import add_clamp

    x = torch.rand(3, 5, 7, device=DEVICE)
    noise = torch.randn(3, 5, 7, device=DEVICE) * 0.5
    torch.testing.assert_close(add_clamp(x, noise, 0.0, 1.0), (x + noise).clamp(0, 1))
    torch.testing.assert_close(add_clamp(x, noise, None, None), x + noise)


# ---------------------------------------------------------------------------------------------
# Without a GPU: every kernel compiles ahead of time for Hopper (sm_90: Triton's own ptxas), which
# catches what the interpreter does not (types, layouts, code generation).

def _aot_cases():
    """(module.kernel, pointer dtype, constexprs, warps): every configuration of each autotune table of
    lkfast.kernels.depthwise in each dtype (the weight gradient with the widest kernel row, BLOCK_KW
    64: kernels up to 63 taps), and the frequency kernel."""
    from lkfast.kernels import depthwise as kernels

    tables = (("_forward_nchw", kernels._NCHW_CONFIGS, {"HAS_BIAS": True, "FLIP": True}),
              ("_forward_nhwc", kernels._NHWC_CONFIGS, {"HAS_BIAS": False, "FLIP": False}),
              ("_weight_grad", kernels._WGRAD_CONFIGS, {"BLOCK_KW": 64}))
    cases = [(f"depthwise.{name}", dtype, {**fixed, **config.kwargs}, config.num_warps)
             for name, configs, fixed in tables for config in configs for dtype in ("fp32", "fp16", "bf16")]
    return cases + [("frequency._add_clamp", "fp32", {"CLAMP": True, "BLOCK": 2048}, 4)]


AOT_CASES = _aot_cases()


@pytest.mark.skipif(INTERPRETED, reason="compiled in the parent process")
@pytest.mark.parametrize("name,dtype,constexprs,warps", AOT_CASES,
                         ids=[f"{c[0]}-{c[1]}-" + "-".join(str(v) for k, v in c[2].items() if k.startswith("BLOCK"))
                              for c in AOT_CASES])
def test_triton_kernel_compiles_for_sm90(name, dtype, constexprs, warps):
    import importlib

    module_name, kernel_name = name.split(".")
    kernel = getattr(importlib.import_module(f"lkfast.kernels.{module_name}"), kernel_name)
    compile_for_sm90(kernel, dtype, constexprs, fp32_pointers=("ws_ptr", "noise_ptr"), fp32_scalars=("lo", "hi"),
                     num_warps=warps)


# ---------------------------------------------------------------------------------------------
# On a GPU: every dtype, RepLKNet / ConvNeXt / SLaK kernel sizes, every layout.



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=case_id)
@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (not the interpreter)")
def test_triton_gpu(shape, fmt, dtype):
    _check_op(shape, fmt, dtype)

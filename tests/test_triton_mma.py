"""Tensor-core Triton kernels (lkfast.kernels.depthwise_mma) against fp64 F.conv2d: forward, input
gradient (the forward with the kernel rotated, ``flip=True``) and weight gradient, at the shared
tolerances of tests/reference.py; and an ahead-of-time compile of every kernel for Hopper (sm_90),
checking that the half-precision products become ``wgmma`` (tensor-core) instructions.

Without a GPU the kernels run on the CPU under TRITON_INTERPRET=1, which must be set before triton
is imported: ``test_mma_kernels_in_interpreter`` reruns this file in a subprocess with it set, so the
rest of the suite keeps its normal triton (as tests/test_triton.py does). Shapes are tiny; the
interpreter's tiles (16) are smaller than the GPU's, so the shapes still cross row, column and
K-chunk edges. In the interpreter bf16 products run in fp32 (its bf16 ``tl.dot`` is broken), so the
bf16 case there checks loads, stores and conversions, and the fp16 case the half-precision product.
"""

import pytest
import torch

from reference import (compile_for_sm90, HAS_CUDA, TRITON_DEVICE, TRITON_INTERPRETED, TRITON_RUNS_HERE, run_module_in_triton_interpreter,
                       triton_runs_here, GPU_SHAPES, TOLERANCE, assert_nonfinite_match, assert_nonfinite_superset,
                       backend_or_skip, case_id, check_op, exact_reference, make_case, make_input, make_weight,
                       nonfinite_reach, reference, rel_err)

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

INTERPRETED, HAS_CUDA, RUN_HERE, DEVICE = TRITON_INTERPRETED, HAS_CUDA, TRITON_RUNS_HERE, TRITON_DEVICE
runs_here = triton_runs_here("test_mma_kernels_in_interpreter")


def test_mma_kernels_in_interpreter():
    run_module_in_triton_interpreter(__file__, timeout=600)


# (N, C, H, W, kh, kw), layout, dtype, bias, method: kernels 3..13, rectangular, odd sizes, batch 1,
# 2 and 17 (more images than the dense path's row block)
CASES = [
    ((2, 3, 9, 11, 5, 5), "contiguous", torch.float32, True, "auto"),      # banded; row blocks straddle two images
    ((2, 2, 10, 19, 7, 3), "channels_last", torch.float16, True, "auto"),  # rectangular, two column tiles
    ((1, 2, 7, 21, 3, 9), "strided", torch.bfloat16, False, "auto"),
    ((1, 1, 3, 33, 11, 13), "contiguous", torch.float16, False, "auto"),   # three column tiles, two K chunks
    ((2, 1, 20, 9, 3, 5), "channels_last", torch.float32, True, "auto"),   # weight gradient in three splits
    # maps no larger than the kernel: "auto" is the dense per-channel product; banded must agree
    ((1, 2, 6, 5, 13, 13), "contiguous", torch.float32, True, "auto"),
    ((1, 2, 6, 5, 13, 13), "contiguous", torch.float32, True, "banded"),
    ((3, 2, 7, 7, 13, 13), "channels_last", torch.float16, True, "auto"),
    ((17, 1, 5, 4, 7, 5), "contiguous", torch.float32, False, "auto"),
    ((2, 2, 9, 8, 7, 9), "strided", torch.bfloat16, True, "dense"),       # dense on a map taller than the kernel
]


def _case_id(case):
    shape, fmt, dtype, bias, method = case
    return f"{case_id(shape)}-{fmt}-{str(dtype).split('.')[-1]}-{'bias' if bias else 'nobias'}-{method}"


@runs_here
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_mma_matches_conv2d(case):
    from lkfast.kernels import depthwise_mma
    from lkfast.ops.backends import output_memory_format

    (N, C, H, W, kh, kw), fmt, dtype, with_bias, method = case
    x = make_input((N, C, H, W), fmt, dtype, DEVICE)
    weight = make_weight(C, kh, kw, dtype, DEVICE)
    bias = torch.randn(C, device=DEVICE).to(dtype) if with_bias else None
    grad_out = make_input((N, C, H, W), fmt, dtype, DEVICE)
    want = reference(x, weight, bias, grad_out)
    got = {
        "forward": depthwise_mma.forward(x, weight, bias, method=method),
        "input_grad": depthwise_mma.forward(grad_out, weight, None, flip=True, method=method),
        "weight_grad": depthwise_mma.weight_grad(grad_out, x, kh, kw, method=method),
    }
    errors = {}
    for name, value in got.items():
        assert value.shape == want[name].shape and value.dtype == dtype, (name, value.shape, value.dtype)
        errors[name] = rel_err(value, want[name])
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype][name]}
    assert not bad, f"{case}: errors {bad} over {TOLERANCE[dtype]}"
    y = got["forward"]
    assert y.is_contiguous(memory_format=output_memory_format(x)), f"{fmt} in: output strides {y.stride()}"


# Inf and NaN. A matrix product multiplies every entry of the band (or of the dense per-channel
# matrix) with every input value of its chunk: the band's zeros meet the input's Inf and NaN, the
# padding's zeros meet the weights' and the output gradient's. So the contract here is a superset
# of the exact masks, as PyTorch's own GPU convolutions give: every NaN and Inf of the sum over
# in-image terms survives (an Inf may become NaN), extra NaN only in the planes (channels, for the
# weight gradient) that hold a non-finite operand, finite values right. The dense weight gradient
# adds only the products of in-image pixel pairs to its taps, so it is exact.
MMA_NONFINITE_CASES = [
    ((1, 3, 5, 5, 7, 7), "contiguous", torch.float16),     # map narrower than the kernel
    ((1, 2, 9, 9, 3, 3), "channels_last", torch.float32),  # map wider than the kernel
]


@runs_here
@pytest.mark.parametrize("method", ["banded", "dense"])
@pytest.mark.parametrize("shape,fmt,dtype", MMA_NONFINITE_CASES,
                         ids=[f"{case_id(c[0])}-{c[1]}-{str(c[2])[6:]}" for c in MMA_NONFINITE_CASES])
def test_mma_nonfinite_is_a_superset_of_the_exact_masks(shape, fmt, dtype, method):
    from lkfast.kernels import depthwise_mma

    kh, kw = shape[-2:]
    for where in ("input", "grad_out", "weight", "all"):
        x, weight, grad_out = make_case(shape, fmt, dtype, where, DEVICE)
        got = {"forward": depthwise_mma.forward(x, weight, method=method),
               "input_grad": depthwise_mma.forward(grad_out, weight, None, flip=True, method=method),
               "weight_grad": depthwise_mma.weight_grad(grad_out, x, kh, kw, method=method)}
        want, reach = exact_reference(x, weight, grad_out), nonfinite_reach(x, weight, grad_out)
        for name, value in got.items():
            what = f"{shape} {fmt} {dtype} {method} {where} {name}"
            if method == "dense" and name == "weight_grad":
                assert_nonfinite_match(value, want[name], TOLERANCE[dtype][name], what)
            else:
                assert_nonfinite_superset(value, want[name], TOLERANCE[dtype][name], what, reach[name])


def test_mma_channels_last_route_choice():
    """channels_last maps of at least NCHW_ROUTE_MIN_PIXELS go through NCHW copies; NCHW, small
    maps, and tensors that are both layouts at once (C = 1) do not."""
    from lkfast.kernels.depthwise_mma import NCHW_ROUTE_MIN_PIXELS, through_nchw

    def t(n, c, h, w, fmt=torch.channels_last):
        return torch.empty(n, c, h, w, device="meta").contiguous(memory_format=fmt)

    assert NCHW_ROUTE_MIN_PIXELS == 28 * 28
    assert through_nchw(t(64, 128, 56, 56)) and through_nchw(t(2, 8, 28, 28))  # stages 1 and 2
    assert not through_nchw(t(64, 512, 14, 14)) and not through_nchw(t(2, 8, 27, 29))  # stage 3; 783 pixels
    assert not through_nchw(t(2, 8, 56, 56, torch.contiguous_format))
    assert not through_nchw(t(2, 1, 56, 56))  # C = 1: channels_last is NCHW too
    assert through_nchw(t(2, 8, 56, 56, torch.contiguous_format), t(2, 8, 56, 56))  # either tensor
    assert through_nchw(t(2, 8, 60, 60)[:, :, 2:58, 2:58])  # a crop of channels_last: channels innermost
    assert not through_nchw(t(2, 8, 60, 60, torch.contiguous_format)[:, :, 2:58, 2:58])


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_mma_channels_last_through_nchw_matches_conv2d(dtype, monkeypatch):
    """With the route taken (threshold lowered to the test's tiny map), every pass gets NCHW
    tensors at the kernels, matches the reference, and returns channels_last as before."""
    from lkfast.kernels import depthwise_mma

    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(all(a.is_contiguous() for a in args if isinstance(a, torch.Tensor) and a.dim() == 4))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_forward_banded_launch", "_weight_grad_banded"):
        monkeypatch.setattr(depthwise_mma, name, Spy(getattr(depthwise_mma, name)))
    monkeypatch.setattr(depthwise_mma, "NCHW_ROUTE_MIN_PIXELS", 9 * 10)
    (N, C, H, W, kh, kw) = (2, 3, 9, 10, 5, 3)
    x = make_input((N, C, H, W), "channels_last", dtype, DEVICE)
    weight = make_weight(C, kh, kw, dtype, DEVICE)
    bias = torch.randn(C, device=DEVICE).to(dtype)
    grad_out = make_input((N, C, H, W), "channels_last", dtype, DEVICE)
    want = reference(x, weight, bias, grad_out)
    got = {"forward": depthwise_mma.forward(x, weight, bias),
           "input_grad": depthwise_mma.forward(grad_out, weight, None, flip=True),
           "weight_grad": depthwise_mma.weight_grad(grad_out, x, kh, kw)}
    assert seen == [True, True, True], seen  # three launches, each on NCHW tensors
    for name, value in got.items():
        assert value.dtype == dtype and value.shape == want[name].shape, name
        assert rel_err(value, want[name]) < TOLERANCE[dtype][name], name
    assert got["forward"].is_contiguous(memory_format=torch.channels_last) and not got["forward"].is_contiguous()
    assert got["input_grad"].is_contiguous(memory_format=torch.channels_last)
    seen.clear()  # the weight gradient with only one of its two tensors channels_last
    for go, xx in ((grad_out, x.contiguous()), (grad_out.contiguous(), x)):
        assert rel_err(depthwise_mma.weight_grad(go, xx, kh, kw), want["weight_grad"]) < TOLERANCE[dtype]["weight_grad"]
    assert seen == [True, True], seen
    seen.clear()
    monkeypatch.setattr(depthwise_mma, "NCHW_ROUTE_MIN_PIXELS", 9 * 10 + 1)  # one pixel short: no route
    depthwise_mma.forward(x, weight, bias)
    assert seen == [False]


def test_mma_method_choice():
    from lkfast.kernels.depthwise_mma import choose_method

    assert choose_method(14, 14, 27, 27) == "dense"    # RepLKNet-31B stage 3
    assert choose_method(7, 7, 13, 13) == "dense"      # stage 4
    assert choose_method(56, 56, 31, 31) == "banded"   # stage 1
    assert choose_method(14, 28, 27, 27) == "banded"   # wider than the kernel
    assert choose_method(7, 7, 13, 13, "banded") == "banded"
    with pytest.raises(ValueError, match="unknown method 'fft'"):
        choose_method(7, 7, 13, 13, "fft")


def test_mma_fp32_products_are_not_tf32():
    """fp32 inputs are multiplied in full fp32 (TF32 would miss the fp32 tolerance on a GPU, and
    the interpreter cannot show it); fp16 always goes to the tensor cores."""
    from lkfast.kernels import depthwise_mma

    assert depthwise_mma._fp32_dot(torch.float32)
    assert not depthwise_mma._fp32_dot(torch.float16)
    assert depthwise_mma._fp32_dot(torch.bfloat16) == depthwise_mma.interpreted()


@runs_here
def test_mma_refuses_even_kernels_and_mismatched_gradients():
    from lkfast.kernels import depthwise_mma

    x = torch.randn(1, 2, 6, 6, device=DEVICE)
    with pytest.raises(ValueError, match="odd kernel sizes"):
        depthwise_mma.forward(x, torch.randn(2, 1, 4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        depthwise_mma.weight_grad(x[:, :, :5], x, 3, 3)


@runs_here
def test_mma_launches_under_the_tensors_device_guard(monkeypatch):
    """Every launch runs inside on_device(x) (torch.cuda.device(x.device) for a GPU tensor)."""
    from lkfast.kernels import depthwise_mma

    guarded = []
    real = depthwise_mma.on_device
    monkeypatch.setattr(depthwise_mma, "on_device", lambda t: guarded.append(t.device) or real(t))
    x = torch.randn(1, 2, 7, 6, device=DEVICE)
    w = torch.randn(2, 1, 5, 3, device=DEVICE)
    depthwise_mma.forward(x, w)
    depthwise_mma.weight_grad(x, x, 5, 3)
    assert guarded == [x.device] * 2


# ---------------------------------------------------------------------------------------------
# The backend "triton_mma" (lkfast.ops.backends.TritonMmaBackend): the op with autograd, named


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,fmt", [((2, 3, 9, 11, 5, 5), "contiguous"), ((1, 2, 6, 5, 13, 13), "channels_last")],
                         ids=lambda v: case_id(v) if isinstance(v, tuple) else v)
def test_mma_backend_through_the_op(shape, fmt, dtype, monkeypatch):
    """depthwise_conv2d(..., backend="triton_mma"): forward, input, weight and bias gradient through
    autograd against fp64 F.conv2d (banded, and dense on a map smaller than the kernel), computed by
    lkfast.kernels.depthwise_mma."""
    from lkfast.kernels import depthwise_mma

    calls = []
    for name in ("forward", "weight_grad"):
        real = getattr(depthwise_mma, name)
        monkeypatch.setattr(depthwise_mma, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    check_op(backend_or_skip("triton_mma", DEVICE, dtype), shape, fmt, dtype, DEVICE)
    assert sorted(calls) == ["forward", "forward", "weight_grad"]  # forward, input gradient, weight gradient


@runs_here
def test_mma_backend_refuses_fp32_and_fp64_by_name():
    import lkfast.ops as ops

    x, w = torch.randn(1, 2, 6, 6, device=DEVICE), torch.randn(2, 1, 3, 3, device=DEVICE)
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(RuntimeError, match=r"'triton_mma' cannot run .*supports float16, bfloat16, got"):
            ops.depthwise_conv2d(x.to(dtype), w.to(dtype), backend="triton_mma")


def test_mma_backend_is_listed_and_not_in_the_default_order():
    """Listed by available_backends() (without a GPU or the interpreter: unavailable, with the
    reason); never in auto's unmeasured default order on a GPU, but a table row may name it (the
    choice itself: test_cuda.py's test_cuda_table_choice_rules)."""
    import lkfast.ops as ops
    from lkfast.ops import cuda_table

    info = ops.available_backends()["triton_mma"]
    assert info.dtypes == ("float16", "bfloat16") and info.devices == ("cuda",)
    assert info.available == (TRITON_RUNS_HERE and not _import_error())
    if not info.available:
        assert info.reason == ops.available_backends()["triton"].reason or "depthwise_mma" in info.reason
    assert "triton_mma" not in cuda_table.DEFAULT_ORDER and "triton_mma" in cuda_table.TABLE_BACKENDS


def _import_error():
    try:
        import lkfast.kernels.depthwise_mma  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA device (none visible to torch here)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=case_id)
def test_mma_backend_on_gpu(shape, fmt, dtype):
    check_op(backend_or_skip("triton_mma", "cuda", dtype), shape, fmt, dtype, "cuda")


# ---------------------------------------------------------------------------------------------
# Without a GPU: every kernel compiles ahead of time for Hopper (sm_90, Triton's own ptxas) with the
# GPU block sizes, and the fp16/bf16 products are tensor-core instructions (wgmma).

_GPU_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
AOT_CASES = [  # kernel, pointer dtype, constexprs, expect wgmma
    ("_forward_banded", "bf16", {"HAS_BIAS": True, "FLIP": True, "IEEE": False, **_GPU_TILES}, True),
    ("_forward_banded", "fp16", {"HAS_BIAS": False, "FLIP": False, "IEEE": False, **_GPU_TILES}, True),
    ("_forward_banded", "fp32", {"HAS_BIAS": True, "FLIP": False, "IEEE": True, **_GPU_TILES}, False),
    ("_weight_grad_banded", "bf16", {"IEEE": False, "BLOCK_KW": 32, **_GPU_TILES}, True),
    ("_weight_grad_banded", "fp32", {"IEEE": True, "BLOCK_KW": 32, **_GPU_TILES}, False),
    ("_forward_dense", "bf16", {"HAS_BIAS": True, "FLIP": True, "IEEE": False, **_GPU_TILES}, True),
    ("_forward_dense", "fp32", {"HAS_BIAS": False, "FLIP": False, "IEEE": True, **_GPU_TILES}, False),
    ("_weight_grad_dense", "fp16", {"IEEE": False, **_GPU_TILES}, True),
]


def _config_cases(name, configs):
    return [(name, "bf16", {"HAS_BIAS": True, "FLIP": False, "IEEE": False, **c.kwargs}, c.num_warps) for c in configs[1:]]


def _autotuned_configs():
    from lkfast.kernels import depthwise_mma

    return (_config_cases("_forward_banded", depthwise_mma._FORWARD_BANDED_CONFIGS)
            + _config_cases("_forward_dense", depthwise_mma._FORWARD_DENSE_CONFIGS))


@pytest.mark.skipif(INTERPRETED, reason="compiled in the parent process")
@pytest.mark.parametrize("name,dtype,constexprs,num_warps", _autotuned_configs(),
                         ids=[f"{c[0]}-{c[2]['BLOCK_M']}x{c[2]['BLOCK_N']}x{c[2]['BLOCK_K']}-w{c[3]}" for c in _autotuned_configs()])
def test_mma_autotune_configs_compile_for_sm90_without_spills(name, dtype, constexprs, num_warps):
    """Every configuration the forward kernels are autotuned over (the first is AOT_CASES' tiles)
    compiles for sm_90 into tensor-core products with nothing spilled."""
    from lkfast.kernels import depthwise_mma

    compiled = compile_for_sm90(getattr(depthwise_mma, name), dtype, constexprs, num_warps=num_warps, no_spills=True)
    assert "wgmma" in compiled.asm["ptx"], f"{name} {constexprs}: no wgmma in the PTX"


def test_mma_forward_is_autotuned_on_a_gpu(monkeypatch):
    """On a GPU the forward kernels launch through triton.autotune over their configurations (the
    first being the timed one), keyed by the sizes, with a grid computed from the chosen tiles;
    LKFAST_TRITON_AUTOTUNE=0 launches the first configuration as it is. (Faked: no kernel runs.)"""
    pytest.importorskip("triton")
    from lkfast.kernels import depthwise, depthwise_mma

    if depthwise_mma.interpreted():
        pytest.skip("the interpreter never autotunes")
    made, launched = [], []

    class Tuned:
        def __init__(self, kernel, configs, key):
            self.kernel, self.configs, self.key = kernel, configs, key

        def __getitem__(self, grid):
            def launch(*args, **flags):
                launched.append((self.kernel, [grid(dict(c.kwargs)) for c in self.configs], flags))
            return launch

    monkeypatch.setattr(depthwise_mma.triton, "autotune",
                        lambda configs, key: lambda kernel: made.append(key) or Tuned(kernel, configs, key))
    for launcher in (depthwise_mma._forward_banded_launch, depthwise_mma._forward_dense_launch):
        monkeypatch.setattr(launcher, "_tuned", None)
    monkeypatch.setattr(depthwise, "_autotune", lambda: True)
    assert depthwise_mma._FORWARD_BANDED_CONFIGS[0].kwargs == {k: v for k, v in depthwise_mma._GPU_CONFIG.items()
                                                               if k != "num_warps"}
    assert depthwise_mma._FORWARD_DENSE_CONFIGS[0].kwargs == depthwise_mma._FORWARD_BANDED_CONFIGS[0].kwargs
    x = torch.randn(2, 3, 56, 56)
    depthwise_mma.forward(x, torch.randn(3, 1, 31, 31))            # banded
    depthwise_mma.forward(x[:, :, :14, :14].contiguous(), torch.randn(3, 1, 27, 27), flip=True)  # dense
    depthwise_mma.forward(x, torch.randn(3, 1, 31, 31))            # the same wrapper again
    assert made == [depthwise_mma.AUTOTUNE_KEY] * 2 == [["N", "C", "H", "W", "KH", "KW"]] * 2
    (k1, grids1, flags1), (k2, grids2, flags2), (k3, _, _) = launched
    assert k1 is depthwise_mma._forward_banded and k2 is depthwise_mma._forward_dense and k3 is k1
    assert grids1 == [(3, -(-2 * 56 // c.kwargs["BLOCK_M"]), -(-56 // c.kwargs["BLOCK_N"]))
                      for c in depthwise_mma._FORWARD_BANDED_CONFIGS]
    assert grids2 == [(3, -(-2 // c.kwargs["BLOCK_M"]), -(-196 // c.kwargs["BLOCK_N"]))
                      for c in depthwise_mma._FORWARD_DENSE_CONFIGS]
    assert flags1 == {"HAS_BIAS": False, "FLIP": False, "IEEE": True} and flags2["FLIP"] is True


@pytest.mark.skipif(INTERPRETED, reason="compiled in the parent process")
@pytest.mark.parametrize("name,dtype,constexprs,tensor_cores", AOT_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in AOT_CASES])
def test_mma_kernel_compiles_for_sm90(name, dtype, constexprs, tensor_cores):
    from lkfast.kernels import depthwise_mma

    # No spills where the backend runs on a GPU (fp16/bf16, tensor cores). The fp32 "ieee" variants
    # serve the interpreter's checks of the formulation; at 64x64 tiles ptxas spills 8 bytes there.
    compiled = compile_for_sm90(getattr(depthwise_mma, name), dtype, constexprs, fp32_pointers=("ws_ptr", "dw_ptr"),
                                no_spills=tensor_cores)
    assert ("wgmma" in compiled.asm["ptx"]) == tensor_cores, (
        f"{name} {dtype}: expected {'tensor-core (wgmma)' if tensor_cores else 'no wgmma'} products in the PTX")

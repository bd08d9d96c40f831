"""lkfast.ops.depthwise_conv2d against torch.nn.functional.conv2d(..., groups=C): forward, input
gradient and weight gradient, for every backend usable on this machine, over kernel sizes,
rectangular kernels, maps smaller than the kernel, odd sizes, batch 1, memory formats and dtypes."""
import pytest
import torch
import torch.nn.functional as F

import lkfast.ops as ops
from lkfast.ops.backends import BACKENDS

# Every backend is listed; those that cannot run here are skipped with the backend's own reason.
ALL_BACKENDS = ["auto"] + list(BACKENDS)


def backend_or_skip(name, device="cpu", dtype=torch.float32):
    if name == "auto":
        return name
    x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    reasons = BACKENDS[name].not_supported_reasons(x, torch.empty(1, 1, 1, 1, device=device, dtype=dtype))
    if reasons:
        pytest.skip(f"backend {name!r} cannot run {device}/{dtype} here: {'; '.join(reasons)}")
    return name


def reference(x, weight, bias, grad_out):
    """fp64 forward and gradients from PyTorch's own conv2d on the same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x64, w64, b64, padding=(kh // 2, kw // 2), groups=x.shape[1])
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], grad_out.double())
    return y, grads


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}

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
]
FORMATS = ["contiguous", "channels_last", "strided"]


def make_input(shape, fmt, dtype, device="cpu"):
    N, C, H, W = shape
    if fmt == "strided":  # a non-contiguous view: every other column of a wider tensor
        return torch.randn(N, C, H, 2 * W, device=device, dtype=dtype)[..., ::2]
    x = torch.randn(N, C, H, W, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_conv2d_fp32(backend, shape, fmt, bias):
    backend = backend_or_skip(backend)
    N, C, H, W, kh, kw = shape
    x = make_input((N, C, H, W), fmt, torch.float32).requires_grad_(True)
    weight = (torch.randn(C, 1, kh, kw) / (kh * kw) ** 0.5).requires_grad_(True)
    b = torch.randn(C, requires_grad=True) if bias else None
    y = ops.depthwise_conv2d(x, weight, b, backend=backend)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, weight, b) if t is not None], grad_out)
    y_ref, grads_ref = reference(x, weight, b, grad_out)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[torch.float32]
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) < TOL[torch.float32], name
    if fmt == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    if fmt == "contiguous":
        assert y.is_contiguous()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 15, 13, 13, 13), (1, 17, 8, 9, 31, 5)], ids=lambda s: "x".join(map(str, s)))
def test_matches_conv2d_other_dtypes(backend, dtype, fmt, shape):
    backend = backend_or_skip(backend, dtype=dtype)
    N, C, H, W, kh, kw = shape
    x = make_input((N, C, H, W), fmt, dtype).requires_grad_(True)
    weight = (torch.randn(C, 1, kh, kw) / (kh * kw) ** 0.5).to(dtype).requires_grad_(True)
    b = torch.randn(C, dtype=dtype, requires_grad=True)
    y = ops.depthwise_conv2d(x, weight, b, backend=backend)
    assert y.dtype == dtype
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, b), grad_out)
    y_ref, grads_ref = reference(x, weight, b, grad_out)
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref):
        assert g.dtype == dtype, name
        assert rel_err(g, g_ref) < TOL[dtype], name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_float64(backend):
    backend = backend_or_skip(backend, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: ops.depthwise_conv2d(a, w, b, backend=backend), (x, weight, bias))


def test_cpu_every_instruction_set():
    """The C++ kernels choose AVX-512/AVX2/baseline at run time; check the other paths in a child
    process with LKFAST_CPU_ISA capping the choice."""
    backend_or_skip("cpu")
    import subprocess
    import sys

    script = (
        "import torch, torch.nn.functional as F, lkfast.ops as ops\n"
        "from lkfast import _ext\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 19, 13, 12); w = torch.randn(19, 1, 9, 7); g = torch.randn(2, 19, 13, 12)\n"
        "y = _ext._C.cpu_forward(x, w, None, False)\n"
        "ref = F.conv2d(x.double(), w.double(), padding=(4, 3), groups=19)\n"
        "gw = _ext._C.cpu_weight_grad(g, x, 9, 7)\n"
        "gw_ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, g.double(), padding=(4, 3), groups=19)\n"
        "assert (y - ref).abs().max() < 1e-4 * ref.abs().max(), 'forward'\n"
        "assert (gw - gw_ref).abs().max() < 1e-4 * gw_ref.abs().max(), 'weight grad'\n"
        "print(_ext._C.cpu_isa())\n"
    )
    for isa in ("generic", "avx2"):
        out = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, "LKFAST_CPU_ISA": isa},
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() in (isa, "generic"), out.stdout


def test_auto_plan_on_cpu():
    w = torch.randn(4, 1, 7, 7)
    x = torch.randn(1, 4, 16, 16)
    if not ops.available_backends()["cpu"].available:
        assert ops.plan_for(x, w) == ("torch", "torch", "torch")
        return
    assert ops.plan_for(x, w) == ("cpu", "cpu", "cpu")
    assert ops.plan_for(x.double(), w.double()) == ("cpu", "cpu", "cpu")
    assert ops.plan_for(x.bfloat16(), w.bfloat16()) == ("torch", "torch", "cpu")
    assert ops.plan_for(x.half(), w.half()) == ("torch", "torch", "cpu")


def test_available_backends_explains():
    info = ops.available_backends()
    assert set(info) == {"torch", "cpu", "cuda", "triton"}
    assert info["torch"].available
    for name, i in info.items():
        assert i.reason, name  # a description when available, the reason when not
    if not torch.cuda.is_available():
        assert not info["cuda"].available


def test_opcheck_registered_ops():
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    w = torch.randn(4, 1, 5, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    for plan in ("torch,torch,torch", "auto"):
        plan = ",".join(ops.plan_for(x, w)) if plan == "auto" else plan
        torch.library.opcheck(torch.ops.lkfast.depthwise_conv2d.default, (x, w, b, plan))
    g = torch.randn(2, 4, 9, 8)
    torch.library.opcheck(torch.ops.lkfast.depthwise_conv2d_input_grad.default, (g, w.detach(), "torch"))
    torch.library.opcheck(torch.ops.lkfast.depthwise_conv2d_weight_grad.default, (g, x.detach(), 5, 3, "torch"))


class _Block(torch.nn.Module):
    def __init__(self, channels=8, k=7):
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


# ---- bad input: each error names the problem -------------------------------------------------

def _args():
    return torch.randn(2, 4, 8, 8), torch.randn(4, 1, 7, 7)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, w: (x[0], w, None), ValueError, r"x must be 4-D"),
        (lambda x, w: (x, w[:3], None), ValueError, r"channel mismatch: x has C = 4 .* 3 kernels"),
        (lambda x, w: (x, torch.randn(4, 1, 6, 7), None), ValueError, r"must be odd .* 6x7"),
        (lambda x, w: (x, torch.randn(4, 2, 7, 7), None), ValueError, r"weight must be \(C, 1, kh, kw\)"),
        (lambda x, w: (x, torch.randn(4, 7, 7), None), ValueError, r"weight must be \(C, 1, kh, kw\)"),
        (lambda x, w: (x, w.double(), None), TypeError, r"dtype mismatch: x is float32 but weight is float64"),
        (lambda x, w: (x.int(), w.int(), None), TypeError, r"unsupported dtype int32"),
        (lambda x, w: (x, w, torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
        (lambda x, w: (x, w.to("meta"), None), ValueError, r"device mismatch"),
    ],
)
def test_bad_input_errors(make, exc, match):
    x, w = _args()
    with pytest.raises(exc, match=match):
        ops.depthwise_conv2d(*make(x, w))


def test_unknown_backend_lists_choices():
    x, w = _args()
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*auto, torch, cpu, cuda, triton"):
        ops.depthwise_conv2d(x, w, backend="fast")


def test_unusable_backend_says_why():
    x, w = _args()
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call .*Backends that can: .*torch"):
        ops.depthwise_conv2d(x, w, backend="cuda")

"""The one reference the op tests compare with (test_depthwise.py, test_triton.py, test_cuda.py).

* ``reference``: forward, input gradient, weight gradient and bias gradient from PyTorch's own
  ``F.conv2d(..., groups=C)`` in fp64, on the same (already rounded) inputs as the op under test.
* ``rel_err``: max |got - ref| / max |ref|, in fp64.
* ``TOLERANCE[dtype][pass]``: the largest ``rel_err`` a backend may have, the same in every file.
* ``make_input`` / ``make_weight``: inputs in each memory layout of ``FORMATS``.
* ``backend_or_skip`` and ``BACKEND_DEVICES``: every backend on every device type it runs on,
  skipped with the backend's own reason where it cannot run here.
* ``check_op``: runs one case through ``lkfast.ops.depthwise_conv2d`` and asserts all of the above.
* Inf and NaN: ``make_case`` plants them near the padding, ``exact_reference`` is the sum over
  in-image terms only, ``assert_nonfinite_match`` asserts NaN/+Inf/-Inf land exactly there.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

PASS_NAMES = ("forward", "input_grad", "weight_grad", "bias_grad")

# Half the unit roundoff of each dtype is the floor; the margins cover fp32 accumulation over up
# to 63x63 taps. The weight gradient sums N*H*W products per tap (split-K partial sums on GPUs),
# so it gets 4x (not in fp64, where every backend accumulates in fp64).
_BASE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
TOLERANCE = {
    dtype: {"forward": tol, "input_grad": tol, "weight_grad": tol if dtype == torch.float64 else 4 * tol, "bias_grad": tol}
    for dtype, tol in _BASE.items()
}

FORMATS = ("contiguous", "channels_last", "strided")

# (N, C, H, W, kh, kw) of the GPU tests of every GPU backend (test_cuda.py, test_triton.py)
GPU_SHAPES = [
    (2, 128, 56, 56, 31, 31),   # RepLKNet-31B stages at 224
    (2, 256, 28, 28, 29, 29),
    (2, 512, 14, 14, 27, 27),
    (2, 1024, 7, 7, 13, 13),
    (2, 96, 56, 56, 7, 7),      # ConvNeXt
    (2, 64, 56, 56, 51, 5),     # SLaK
    (2, 64, 56, 56, 5, 51),
    (1, 33, 17, 19, 63, 63),
    (3, 5, 70, 33, 3, 3),
    (1, 7, 9, 9, 1, 31),
]
HAS_CUDA = torch.cuda.is_available()

# Each backend on each device type it can run on; on a GPU machine every one of them runs.
BACKEND_DEVICES = [("torch", "cpu"), ("cpu", "cpu"), ("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
DEVICES = ["cpu", "cuda"]


def case_id(value) -> str:
    """pytest id of a shape tuple or a (backend, device) pair."""
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return "-".join(value)
    return "x".join(map(str, value))


def device_or_skip(device: str) -> str:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (none visible to torch here)")
    return device


def backend_or_skip(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """``name``, or a skip carrying the backend's own reason why it cannot run ``device``/``dtype``."""
    device_or_skip(device)
    if name == "auto":
        return name
    from lkfast.ops.backends import BACKENDS

    probe = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    reasons = BACKENDS[name].not_supported_reasons(probe, probe)
    if reasons:
        pytest.skip(f"backend {name!r} cannot run {device}/{dtype} here: {'; '.join(reasons)}")
    return name


def make_input(shape, fmt: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """A standard-normal ``(N, C, H, W)`` tensor in layout ``fmt``: "contiguous", "channels_last",
    or "strided" (a view of every other column of a tensor twice as wide)."""
    N, C, H, W = shape
    if fmt == "strided":
        return torch.randn(N, C, H, 2 * W, device=device).to(dtype)[..., ::2]
    x = torch.randn(N, C, H, W, device=device).to(dtype)
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if fmt != "contiguous":
        raise ValueError(f"unknown layout {fmt!r}; choose one of {', '.join(FORMATS)}")
    return x


def make_weight(C: int, kh: int, kw: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """``(C, 1, kh, kw)`` weights scaled by 1/sqrt(kh*kw), so outputs stay O(1) at every kernel size."""
    return (torch.randn(C, 1, kh, kw, device=device) / (kh * kw) ** 0.5).to(dtype)


def reference(x, weight, bias, grad_out) -> dict[str, torch.Tensor]:
    """fp64 results of PyTorch's conv2d on the same inputs: {pass name: tensor} ("bias_grad" only
    with a bias)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x64, w64, b64, padding=(kh // 2, kw // 2), groups=x.shape[1])
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], grad_out.double())
    return dict(zip(PASS_NAMES, (y.detach(),) + grads))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in fp64 (the scale of the whole tensor, not per element)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


def run_op(x, weight, bias, grad_out, backend: str) -> dict[str, torch.Tensor]:
    """The op's forward and gradients under ``backend``, as {pass name: tensor}."""
    import lkfast.ops as ops

    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    bias = None if bias is None else bias.detach().requires_grad_(True)
    y = ops.depthwise_conv2d(x, weight, bias, backend=backend)
    grads = torch.autograd.grad(y, [t for t in (x, weight, bias) if t is not None], grad_out)
    return dict(zip(PASS_NAMES, (y.detach(),) + grads))


def check_op(backend: str, shape, fmt: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
             bias: bool = True) -> dict[str, float]:
    """Run ``depthwise_conv2d(backend=...)`` on one case, shape ``(N, C, H, W, kh, kw)``, and assert
    every pass against ``reference`` within ``TOLERANCE``, plus dtypes, shapes and the output layout
    (channels_last in, channels_last out; contiguous otherwise). Returns the errors by pass."""
    N, C, H, W, kh, kw = shape
    x = make_input((N, C, H, W), fmt, dtype, device)
    weight = make_weight(C, kh, kw, dtype, device)
    b = torch.randn(C, device=device).to(dtype) if bias else None
    grad_out = make_input((N, C, H, W), fmt, dtype, device)  # the output gradient in the same layout
    got = run_op(x, weight, b, grad_out, backend)
    want = reference(x, weight, b, grad_out)
    assert set(got) == set(want)
    errors = {}
    for name, value in got.items():
        assert value.shape == want[name].shape and value.dtype == dtype, (name, value.shape, value.dtype)
        errors[name] = rel_err(value, want[name])
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype][name]}
    assert not bad, f"{backend} {shape} {fmt} {dtype}: errors {bad} over {TOLERANCE[dtype]}"
    y = got["forward"]
    if fmt == "channels_last" and C > 1:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    elif fmt == "contiguous":
        assert y.is_contiguous(), "contiguous in, contiguous out"
    return errors


# --- Triton on the CPU: a test module runs itself again under TRITON_INTERPRET=1 -----------------
# Triton fixes interpretation when it is imported, so a module of Triton tests is run a second time
# in a subprocess with the variable set; in that process (or on a GPU) its tests run directly.
_ISA_CHILD = """
import sys, torch
from lkfast import _ext
if len(sys.argv) > 3:
    torch.set_num_threads(int(sys.argv[3]))
cases = torch.load(sys.argv[1])
out = []
for x, w, g, b in cases:
    kh, kw = w.shape[-2:]
    out.append((_ext._C.cpu_forward(x, w, b, False), _ext._C.cpu_forward(g, w, None, True),
                _ext._C.cpu_weight_grad(g, x, kh, kw)))
torch.save({"isa": _ext._C.cpu_isa(), "out": out}, sys.argv[2])
"""

ISA_ORDER = ["generic", "avx2", "avx512", "avx512bf16"]  # the order LKFAST_CPU_ISA caps in: it can only lower the CPU's best


def cpu_kernels_on_isa(isa: str, cases, tmp_path, threads=None) -> list:
    """(forward, input gradient, weight gradient) of the C++ kernels for each case (x, weight,
    grad_out, bias or None; the bias goes to the forward only) on instruction set ``isa``.
    LKFAST_CPU_ISA is read once per process, so they run in a child process (on ``threads``
    threads when given). Fails if the cap was ignored; skips,
    saying which path ran, when this CPU has no ``isa``."""
    torch.save(cases, tmp_path / "in.pt")
    env = {**os.environ, "LKFAST_CPU_ISA": isa}
    args = [sys.executable, "-c", _ISA_CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    proc = subprocess.run(args + ([str(threads)] if threads else []), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert ISA_ORDER.index(result["isa"]) <= ISA_ORDER.index(isa), \
        f"LKFAST_CPU_ISA={isa} ran {result['isa']}: the cap was ignored"
    if result["isa"] != isa:
        from lkfast import _ext

        why = _ext._C.cpu_isa_note() or f"this CPU has no {isa}"  # or this build left it out
        pytest.skip(f"{why}: with LKFAST_CPU_ISA={isa} the kernels ran the {result['isa']} path, "
                    f"so the {isa} path is untested on this machine")
    return result["out"]


TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_RUNS_HERE = TRITON_INTERPRETED or HAS_CUDA
TRITON_DEVICE = "cuda" if HAS_CUDA and not TRITON_INTERPRETED else "cpu"


def triton_runs_here(interpreter_test: str):
    """Skip mark for Triton tests where neither a GPU nor the interpreter is there (they run in the
    interpreter subprocess started by ``interpreter_test``)."""
    return pytest.mark.skipif(not TRITON_RUNS_HERE, reason="no CUDA device: these run on the CPU in the "
                              f"TRITON_INTERPRET=1 subprocess of {interpreter_test}")


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem() -> str:
    """Why Triton's interpreter cannot run lkfast's kernels in this environment ('' when it can),
    as the kernels module says it under TRITON_INTERPRET=1 (a subprocess: Triton reads the variable
    when it is imported)."""
    probe = subprocess.run([sys.executable, "-c", "from lkfast.kernels.depthwise import unavailable_reason as r; "
                            "print(r() or '')"], env=dict(os.environ, TRITON_INTERPRET="1"),
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    return probe.stdout.strip()


def run_module_in_triton_interpreter(module_file: str, timeout: int = 900) -> None:
    """Run the test module ``module_file`` in a subprocess under TRITON_INTERPRET=1; fails with the
    subprocess's output when any of its tests fails or none ran."""
    if TRITON_RUNS_HERE:
        pytest.skip("this process runs the Triton tests directly")
    problem = triton_interpreter_problem()
    if problem:
        pytest.skip(problem)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(module_file)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def cuobjdump() -> str | None:
    """The path of cuobjdump: on PATH, else the copy that ships inside Triton's wheel; None."""
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def resource_usage(binary: str) -> list[tuple[str, str, dict]]:
    """(arch, mangled function name, {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}) of every GPU
    function in ``binary`` (a shared library with a fat binary, or a cubin), as ``cuobjdump
    -res-usage`` reads them off the machine code. STACK holds what ptxas spilled; LOCAL, local arrays."""
    import re

    out = subprocess.run([cuobjdump(), "-res-usage", binary], capture_output=True, text=True, check=True).stdout
    usage, arch, function = [], None, None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function is not None and line.startswith("REG:"):
            usage.append((arch, function, {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}))
            function = None
    return usage


def compile_for_sm90(kernel, dtype: str, constexprs: dict, fp32_pointers=(), fp32_scalars=(), num_warps: int = 4,
                     no_spills: bool = True):
    """Compile the Triton ``kernel`` ahead of time for Hopper (sm_90, Triton's own ptxas) with every
    ``*_ptr`` argument a pointer to ``dtype`` (those in ``fp32_pointers``: to fp32), the arguments in
    ``fp32_scalars`` fp32, the rest i32, ``constexprs`` and ``num_warps``; asserts a binary came out
    and, where cuobjdump is found and ``no_spills``, that nothing spilled; returns the compiled kernel (its ``asm``
    holds the PTX)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for arg in inspect.signature(kernel.fn).parameters:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in fp32_pointers:
            signature[arg] = "*fp32"
        elif arg in fp32_scalars:
            signature[arg] = "fp32"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + dtype
        else:
            signature[arg] = "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), "no sm_90 binary"
    if no_spills and cuobjdump():  # ptxas spilled nothing, and no local array
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            (_, name, usage), = resource_usage(f.name)
        assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{name} ({constexprs}, {num_warps} warps): {usage}"
    return compiled

# --- Inf and NaN: the exact sum over in-image terms, and non-finite values planted near the padding
# test_cpu_nonfinite.py (the C++ kernels: exact) and the GPU kernels' tests (test_triton.py,
# test_triton_mma.py, test_cuda.py) compare with these. Results are fp64 on the CPU whatever the
# operands' device.


def exact_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise "same" convolution in fp64 as a sum over taps of the in-image terms only: each tap
    adds weight * shifted input where both the output and the input pixel are inside the map."""
    x, weight = x.detach().cpu().double(), weight.detach().cpu().double()
    N, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    y = torch.zeros(N, C, H, W, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            di, dj = i - kh // 2, j - kw // 2
            h0, h1, w0, w1 = max(0, -di), min(H, H - di), max(0, -dj), min(W, W - dj)
            if h0 < h1 and w0 < w1:
                tap = weight[:, 0, i, j].view(1, C, 1, 1)
                y[:, :, h0:h1, w0:w1] += tap * x[:, :, h0 + di:h1 + di, w0 + dj:w1 + dj]
    return y


def exact_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """d(sum grad_out * exact_conv(x, w)) / dw: per tap, the sum of grad_out * input over the pixel
    pairs inside the map."""
    g, x = grad_out.detach().cpu().double(), x.detach().cpu().double()
    N, C, H, W = x.shape
    gw = torch.zeros(C, 1, kh, kw, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            di, dj = i - kh // 2, j - kw // 2
            h0, h1, w0, w1 = max(0, -di), min(H, H - di), max(0, -dj), min(W, W - dj)
            if h0 < h1 and w0 < w1:
                gw[:, 0, i, j] = (g[:, :, h0:h1, w0:w1] * x[:, :, h0 + di:h1 + di, w0 + dj:w1 + dj]).sum((0, 2, 3))
    return gw


def exact_reference(x, weight, grad_out) -> dict[str, torch.Tensor]:
    """Forward, input gradient (the forward with the kernel rotated by 180 degrees) and weight
    gradient, each a sum over in-image terms only, in fp64."""
    kh, kw = weight.shape[-2:]
    return {"forward": exact_conv(x, weight), "input_grad": exact_conv(grad_out, weight.flip(-2, -1)),
            "weight_grad": exact_weight_grad(grad_out, x, kh, kw)}


def plant_map(t: torch.Tensor, salt: int) -> torch.Tensor:
    """A copy of the (N, C, H, W) tensor ``t`` with NaN, +Inf and -Inf at edge, corner and inner
    pixels of a few channels (where the padding the kernels multiply is nearest)."""
    t = t.clone()
    N, C, H, W = t.shape
    spots = [(0, 1 % C, H // 2, 0, float("nan")), (N - 1, C - 1, 0, W - 1, float("inf")),
             (0, C // 2, H - 1, W // 2, float("-inf")), (N - 1, (3 + salt) % C, H // 3, (1 + salt) % W, float("nan")),
             (0, (5 + salt) % C, (2 + salt) % H, W - 1 - (salt % W), float("inf"))]
    for n, c, h, w, value in spots:
        t[n, c, h, w] = value
    return t


def plant_weight(weight: torch.Tensor) -> torch.Tensor:
    """A copy of the (C, 1, kh, kw) weight with NaN, +Inf and -Inf at corner and edge taps (those
    that meet the image least) of a few channels."""
    weight = weight.clone()
    C, _, kh, kw = weight.shape
    for c, i, j, value in [(1 % C, 0, 0, float("nan")), (C - 1, kh - 1, kw - 1, float("inf")),
                           (C // 2, 0, kw - 1, float("-inf")), (2 % C, kh // 2, 0, float("nan"))]:
        weight[c, 0, i, j] = value
    return weight


def make_case(shape, fmt, dtype, where, device="cpu"):
    """x, weight, grad_out of one case on ``device``, with non-finite values planted in the ``where``
    operands ("input", "grad_out", "weight", "all"; anything else: none)."""
    N, C, H, W, kh, kw = shape
    x = make_input((N, C, H, W), fmt, dtype, device)
    weight = make_weight(C, kh, kw, dtype, device)
    grad_out = make_input((N, C, H, W), fmt, dtype, device)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    if where in ("input", "all"):
        x = plant_map(x, 0).contiguous(memory_format=memory_format)
    if where in ("grad_out", "all"):
        grad_out = plant_map(grad_out, 1).contiguous(memory_format=memory_format)
    if where in ("weight", "all"):
        weight = plant_weight(weight)
    return x, weight, grad_out


def assert_nonfinite_match(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> None:
    """NaN, +Inf and -Inf exactly where ``want`` has them; elsewhere within ``tolerance`` of the
    largest finite |want|."""
    got = got.detach().cpu().double()
    for name, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        differ = mask(got) != mask(want)
        if differ.any():
            where = differ.nonzero()[:6].tolist()
            raise AssertionError(f"{what}: {name} placement differs from the exact sum at {int(differ.sum())} "
                                 f"of {got.numel()} outputs (got {int(mask(got).sum())}, want "
                                 f"{int(mask(want).sum())}), first at {where}")
    finite = torch.isfinite(want)
    if finite.any():
        scale = want[finite].abs().max().clamp_min(1e-12)
        err = ((got[finite] - want[finite]).abs().max() / scale).item()
        assert err < tolerance, f"{what}: finite values off by {err} (tolerance {tolerance})"


def nonfinite_reach(x, weight, grad_out) -> dict[str, torch.Tensor]:
    """Per pass, the outputs a non-finite operand can reach at all: forward and input gradient, the
    (image, channel) planes whose map or channel weights hold a NaN or Inf; weight gradient, the
    channels whose input or output gradient does. Extra NaN from zeros (padding, a Toeplitz band's
    zeros) times a non-finite value stays inside these."""
    def bad_planes(t):  # (N, C) -> (N, C, 1, 1)
        return (~torch.isfinite(t.detach().cpu())).flatten(2).any(2)[:, :, None, None]

    bad_weight = (~torch.isfinite(weight.detach().cpu())).flatten(1).any(1)  # (C,)
    N, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    bad_channels = bad_planes(x).any(0) | bad_planes(grad_out).any(0)  # (C, 1, 1)
    return {"forward": (bad_planes(x) | bad_weight[None, :, None, None]).expand(N, C, H, W),
            "input_grad": (bad_planes(grad_out) | bad_weight[None, :, None, None]).expand(N, C, H, W),
            "weight_grad": bad_channels[:, None].expand(C, 1, kh, kw)}


def assert_nonfinite_superset(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str,
                              reach: torch.Tensor) -> None:
    """The contract of kernels that multiply zeros (padding, a band's zeros) by their operands:
    every NaN of ``want`` is NaN, every +-Inf the same Inf or NaN, no Inf where ``want`` has none,
    extra NaN only inside ``reach`` (``nonfinite_reach``), and the outputs finite in both within
    ``tolerance`` of the largest finite |want|. Returns nothing; raises naming the first breach."""
    got = got.detach().cpu().double()
    nan = torch.isnan(got)
    for name, mask, kept in (("NaN", torch.isnan(want), nan),
                             ("+Inf", torch.isposinf(want), torch.isposinf(got) | nan),
                             ("-Inf", torch.isneginf(want), torch.isneginf(got) | nan)):
        lost = mask & ~kept
        if lost.any():
            raise AssertionError(f"{what}: lost {int(lost.sum())} {name} of the exact sum, first at "
                                 f"{lost.nonzero()[:6].tolist()}")
    stray_inf = torch.isinf(got) & ~torch.isinf(want)
    assert not stray_inf.any(), f"{what}: Inf where the exact sum has none, at {stray_inf.nonzero()[:6].tolist()}"
    stray_nan = nan & ~torch.isnan(want) & ~reach
    assert not stray_nan.any(), (f"{what}: NaN where no non-finite operand reaches, at "
                                 f"{stray_nan.nonzero()[:6].tolist()}")
    finite = torch.isfinite(want) & torch.isfinite(got)
    if finite.any():
        scale = want[torch.isfinite(want)].abs().max().clamp_min(1e-12)
        err = ((got[finite] - want[finite]).abs().max() / scale).item()
        assert err < tolerance, f"{what}: finite values off by {err} (tolerance {tolerance})"


def func_transforms(x: torch.Tensor, w: torch.Tensor) -> dict:
    """name -> transform(f) of ``f(x, w)`` under torch.func (vmap over inputs and over weights, jvp,
    jacrev, a second derivative): what the op must compute as F.conv2d does (test_depthwise.py on the
    CPU, test_cuda.py on a GPU)."""
    func = torch.func
    return {
        "vmap over x": lambda f: func.vmap(f, in_dims=(0, None))(x.unsqueeze(1), w),
        "vmap over w": lambda f: func.vmap(f, in_dims=(None, 0))(x, torch.stack([w, 2 * w])),
        "jvp": lambda f: func.jvp(f, (x, w), (torch.ones_like(x), w.cos())),
        "jacrev": lambda f: func.jacrev(f, argnums=1)(x[:1, :, :4, :4], w),
        "grad of grad": lambda f: func.grad(lambda w: func.grad(lambda w: f(x, w).pow(3).sum())(w).square().sum())(w),
    }

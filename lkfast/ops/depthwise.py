"""Depthwise convolution with large odd kernels, stride 1 and zero "same" padding.

``depthwise_conv2d`` validates its input, picks a backend for each of the three passes
(forward, input gradient, weight gradient) and calls the registered custom op
``torch.ops.lkfast.depthwise_conv2d``, whose autograd formula calls two more custom ops for the
gradients. Every op has a fake (meta) implementation, so the op traces under ``torch.compile``.

The input gradient of a stride-1, same-padded convolution with an odd kernel is the forward
convolution of the output gradient with the kernel rotated by 180 degrees; every backend computes
it that way, so the fastest forward path also serves the input gradient (what attacks need).
"""
from __future__ import annotations

from typing import Optional

import torch

from lkfast.ops.backends import BACKENDS, FLOAT_DTYPES, output_memory_format

BACKEND_NAMES = ("auto",) + tuple(BACKENDS)

# On the CPU, `auto` runs the forward and input gradient with lkfast's kernel for these dtypes and
# with oneDNN (backend "torch", channels_last) for the others; the weight gradient always with
# lkfast's kernel. Set from benchmarks/results/depthwise_cpu.md.
CPU_OWN_FORWARD_DTYPES = (torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_inputs(x, weight, bias) -> None:
    """Raises a ValueError/TypeError naming what is wrong with the arguments, if anything."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"depthwise_conv2d: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv2d: x must be 4-D (N, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(
            f"depthwise_conv2d: weight must be (C, 1, kh, kw) (one kernel per channel), got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] != C:
        raise ValueError(
            f"depthwise_conv2d: channel mismatch: x has C = {C} channels but weight has {weight.shape[0]} kernels; "
            f"weight must be ({C}, 1, kh, kw)"
        )
    kh, kw = weight.shape[2], weight.shape[3]
    if kh % 2 == 0 or kw % 2 == 0 or kh < 1 or kw < 1:
        raise ValueError(
            f"depthwise_conv2d: kernel size must be odd in both dimensions (same padding is symmetric only for odd "
            f"sizes), got {kh}x{kw}"
        )
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"depthwise_conv2d: unsupported dtype {_dtype_name(t.dtype)} for {name}; use one of "
                + ", ".join(_dtype_name(d) for d in FLOAT_DTYPES)
            )
    if weight.dtype != x.dtype:
        raise TypeError(
            f"depthwise_conv2d: dtype mismatch: x is {_dtype_name(x.dtype)} but weight is {_dtype_name(weight.dtype)}; "
            f"cast one of them (e.g. weight.to(x.dtype))"
        )
    if weight.device != x.device:
        raise ValueError(f"depthwise_conv2d: device mismatch: x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"depthwise_conv2d: bias must be a tensor or None, got {type(bias).__name__}")
        if bias.shape != (C,):
            raise ValueError(f"depthwise_conv2d: bias must have shape ({C},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(
                f"depthwise_conv2d: dtype mismatch: x is {_dtype_name(x.dtype)} but bias is {_dtype_name(bias.dtype)}"
            )
        if bias.device != x.device:
            raise ValueError(f"depthwise_conv2d: device mismatch: x is on {x.device} but bias is on {bias.device}")


def _usable(name: str, x, weight) -> bool:
    return not BACKENDS[name].not_supported_reasons(x, weight)


def plan_for(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> tuple[str, str, str]:
    """The backends (forward, input gradient, weight gradient) that ``backend`` means for this call.

    ``auto`` follows the measurements in benchmarks/results: on the CPU, lkfast's C++ kernel for
    the weight gradient (PyTorch's runs at a few GFLOP/s) and, in fp32/fp64, for the forward and
    input gradient too; fp16/bf16 forward and input gradient on oneDNN (``CPU_OWN_FORWARD_DTYPES``);
    on CUDA, the measured table in ``lkfast.ops.cuda_table``. A named backend is used for all three
    passes.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"depthwise_conv2d: unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if backend != "auto":
        reasons = BACKENDS[backend].not_supported_reasons(x, weight)
        if reasons:
            usable = [n for n in BACKENDS if _usable(n, x, weight)]
            raise RuntimeError(
                f"depthwise_conv2d: backend {backend!r} cannot run this call ({x.device.type}, {_dtype_name(x.dtype)}): "
                + "; ".join(reasons)
                + f". Backends that can: {', '.join(usable) or 'none'} (or use backend='auto')"
            )
        return (backend, backend, backend)
    if x.device.type == "cpu":
        if not _usable("cpu", x, weight):
            return ("torch", "torch", "torch")
        # fp32/fp64: lkfast's kernel measured level with oneDNN's channels_last forward and ahead of
        # it for the attack step (benchmarks/results/depthwise_cpu.md). fp16/bf16 forward stays on
        # oneDNN, which has native half-precision (AMX) paths; our kernel computes them in fp32.
        forward = "cpu" if x.dtype in CPU_OWN_FORWARD_DTYPES else "torch"
        return (forward, forward, "cpu")
    if x.device.type == "cuda":
        from lkfast.ops import cuda_table  # measured on a GPU by benchmarks/gpu_check.sh

        return cuda_table.choose(x, weight, usable=lambda n: _usable(n, x, weight))
    return ("torch", "torch", "torch")


# ---------------------------------------------------------------------------------------------
# Registered custom ops. `plan` is "forward,input_grad,weight_grad" backend names.


@torch.library.custom_op("lkfast::depthwise_conv2d", mutates_args=())
def _depthwise_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], plan: str) -> torch.Tensor:
    return BACKENDS[plan.split(",")[0]].forward(x, weight, bias, False)


@_depthwise_conv2d_op.register_fake
def _(x, weight, bias, plan):
    return torch.empty_like(x, memory_format=output_memory_format(x))


@torch.library.custom_op("lkfast::depthwise_conv2d_input_grad", mutates_args=())
def _input_grad_op(grad_out: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS[backend].forward(grad_out, weight, None, True)


@_input_grad_op.register_fake
def _(grad_out, weight, backend):
    return torch.empty_like(grad_out, memory_format=output_memory_format(grad_out))


@torch.library.custom_op("lkfast::depthwise_conv2d_weight_grad", mutates_args=())
def _weight_grad_op(grad_out: torch.Tensor, x: torch.Tensor, kh: int, kw: int, backend: str) -> torch.Tensor:
    return BACKENDS[backend].weight_grad(grad_out, x, kh, kw)


@_weight_grad_op.register_fake
def _(grad_out, x, kh, kw, backend):
    return x.new_empty((x.shape[1], 1, kh, kw))


def _setup_context(ctx, inputs, output):
    x, weight, bias, plan = inputs
    ctx.plan = plan.split(",")
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    _, input_backend, weight_backend = ctx.plan
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _input_grad_op(grad, weight, input_backend)
    if ctx.needs_input_grad[1]:
        grad_w = _weight_grad_op(grad, x, weight.shape[2], weight.shape[3], weight_backend)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum(dim=(0, 2, 3), dtype=torch.float32 if grad.dtype != torch.float64 else None).to(grad.dtype)
    return grad_x, grad_w, grad_b, None


_depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     backend: str = "auto") -> torch.Tensor:
    """Depthwise 2-D convolution, stride 1, zero "same" padding: ``F.conv2d(x, weight, bias,
    padding=(kh // 2, kw // 2), groups=C)``, computed by the fastest correct backend.

    x: ``(N, C, H, W)`` in any memory format (the output has the same one: channels_last in,
    channels_last out). weight: ``(C, 1, kh, kw)`` with odd kh, kw (square or not, any size).
    bias: ``(C,)`` or None. float32, float16, bfloat16 or float64, all three on one device.
    Differentiable in x, weight and bias. ``backend``: "auto", "torch", "cpu", "cuda" or "triton";
    ``lkfast.ops.available_backends()`` lists which can run here and why the others cannot.
    Raises ValueError/TypeError for bad shapes, dtypes or devices and RuntimeError when the named
    backend cannot run the call, each naming the problem.
    """
    _check_inputs(x, weight, bias)
    plan = plan_for(x, weight, backend)
    return _depthwise_conv2d_op(x, weight, bias, ",".join(plan))

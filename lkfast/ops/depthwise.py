"""Depthwise convolution with large odd kernels, stride 1 and zero "same" padding.

``depthwise_conv2d`` validates its input, picks a backend for each of the three passes
(forward, input gradient, weight gradient) and calls the registered custom op
``torch.ops.lkfast.depthwise_conv2d``, whose autograd formula calls two more custom ops for the
gradients. Every op has a fake (meta) implementation, so the op traces under ``torch.compile``.
Under ``torch.compile`` with ``backend="auto"`` the plan is not chosen while tracing: the ops
receive ``"auto"`` and choose from the real tensors when they run, so one graph serves every shape
(dynamic batch sizes, image sizes) and picks the same backends as eager mode would.

In eager mode (no tracing, compiling, profiling or tensor subclass, no dispatch or torch-function
mode) a call skips the registered op and runs the same backends through ``_Eager``, a plain
``torch.autograd.Function``: the registered op's dispatch (schema parsing, the autograd wrapper's
redispatch, its alias check) cost ~20 us of host time per forward and ~80 us per forward + input
gradient on this project's CPU (benchmarks/bench_host_overhead.py), as much as a whole stage-3
layer's kernels take on a GPU. Anything
that must see the op (torch.compile, torch.export, jit.trace, FlopCounterMode, FakeTensorMode, the
profiler) still gets it; both paths share the plan, the backends and the backward formula. An eager
call autograd does not record (no_grad, inference_mode, no tensor requiring a gradient: the
evaluation's forwards) runs the forward backend alone, without ``_Eager`` (8 us less host time a
call in a tight loop on a Zen 3 EPYC, 25 against 34 us).

The input gradient of a stride-1, same-padded convolution with an odd kernel is the forward
convolution of the output gradient with the kernel rotated by 180 degrees; every backend computes
it that way, so the fastest forward path also serves the input gradient (what attacks need).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from lkfast.ops.backends import (BACKENDS, FLOAT_DTYPES, PASSES, Plan, convolution_backward, dtype_name,
                                 output_memory_format, remembered)
from lkfast.ops import cpu_dispatch, cuda_table

BACKEND_NAMES = ("auto",) + tuple(BACKENDS)

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
                f"depthwise_conv2d: unsupported dtype {dtype_name(t.dtype)} for {name}; use one of "
                + ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
            )
    if weight.dtype != x.dtype:
        raise TypeError(
            f"depthwise_conv2d: dtype mismatch: x is {dtype_name(x.dtype)} but weight is {dtype_name(weight.dtype)}; "
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
                f"depthwise_conv2d: dtype mismatch: x is {dtype_name(x.dtype)} but bias is {dtype_name(bias.dtype)}"
            )
        if bias.device != x.device:
            raise ValueError(f"depthwise_conv2d: device mismatch: x is on {x.device} but bias is on {bias.device}")


def _usable(name: str, x, weight) -> bool:
    return not BACKENDS[name].not_supported_reasons(x, weight)


@dataclasses.dataclass(frozen=True)
class PlanExplanation:
    """What ``plan_for(..., explain=True)`` returns: the plan, where it came from, and for every
    backend that runs none or only some of the passes, why it was passed over."""

    plan: Plan
    source: str  # the rule or the measured table row that made the plan
    passed_over: dict[str, str]  # backend name -> why it does not run (all of) the passes

    def __str__(self):
        lines = [f"plan: forward={self.plan.forward}, input_grad={self.plan.input_grad}, "
                 f"weight_grad={self.plan.weight_grad}", f"because: {self.source}"]
        lines += [f"  {name}: {why}" for name, why in self.passed_over.items()]
        return "\n".join(lines)


def _cpu_plan(x, weight) -> tuple[Plan, str]:
    if not _usable("cpu", x, weight):
        return Plan.single("torch"), "on the CPU, PyTorch (oneDNN) wherever lkfast's C++ kernels cannot run"
    # The op asks on every call; choosing costs ~30 us of Python (shape class, file-backed cache,
    # sentences; with calibration off ~0.3 ms, the shipped table's rows scanned), as much as a whole
    # 7x7-map layer call takes in some passes. Within one calibration (or with calibration off, one
    # table) the answer for a shape cannot change, so it is kept per exact shape and strides
    # (the layout follows from them), a key read without any Python of ours: the memo's own cost
    # was half of auto's host time per call (7 of ~13 us on this project's CPU).
    key = (x.shape, x.stride(), weight.shape, x.dtype)
    return cpu_dispatch.remembered(_PLAN_MEMO, key, lambda: _measured_cpu_plan(
        tuple(x.shape), tuple(weight.shape), dtype_name(x.dtype), output_memory_format(x) == torch.channels_last))


_PLAN_MEMO: dict = {}  # (x shape, x strides, weight shape, dtype) -> (choices_token, (plan, source))


def _cuda_plan(x, weight, gpu: str | None = None) -> tuple[Plan, str]:
    # The measured table's choice (lkfast.ops.cuda_table, measured on a GPU by benchmarks/bench_gpu.py).
    # Asking it (which backends can run the call, the table's key, file and kept choice) cost 22 us of
    # Python per call on the Zen 5 (benchmarks/results/host_overhead_cpu_zen5.md; more on a GPU, whose
    # launch check it then reaches), against ~30 us for a stage-4 kernel on an H200; kept: 4.7 us.
    # For one table file the answer for an exact shape, strides, dtype and device cannot change, so
    # it is kept against the file's stamp (its path, time, inode and size: a stat per call).
    # (gpu: a GPU name to file CPU tensors under, for tests.)
    key = (x.shape, x.stride(), weight.shape, x.dtype, x.device, gpu)
    return remembered(_CUDA_PLAN_MEMO, key, cuda_table.table_stamp(),
                      lambda: cuda_table.choose(x, weight, usable=lambda n: _usable(n, x, weight), gpu=gpu))


_CUDA_PLAN_MEMO: dict = {}  # (x shape, x strides, weight shape, dtype, device, gpu) -> (table stamp, (plan, source))


def _measured_cpu_plan(x_shape: tuple, weight_shape: tuple, dtype: str, channels_last: bool) -> tuple[Plan, str]:
    # The faster of lkfast's kernel and oneDNN for each pass, measured on this machine (or taken
    # from the shipped per-instruction-set table): see lkfast.ops.cpu_dispatch. It needs only the
    # call's shapes, dtype and layout, which meta tensors carry.
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(x_shape, dtype=getattr(torch, dtype), device="meta", memory_format=memory_format)
    weight = torch.empty(weight_shape, dtype=getattr(torch, dtype), device="meta")
    forward = cpu_dispatch.choose(x, weight, "forward")
    weight_grad = cpu_dispatch.choose(x, weight, "weight_grad")
    source = (f"on the CPU in {dtype}: forward and input gradient on {forward.backend} "
              f"({forward.source}); weight gradient on {weight_grad.backend} ({weight_grad.source})")
    return Plan(forward.backend, forward.backend, weight_grad.backend), source


def _explain(plan: Plan, source: str, x, weight) -> PlanExplanation:
    passed_over = {}
    for name, backend in BACKENDS.items():
        runs = [p for p, chosen in zip(PASSES, plan) if chosen == name]
        if len(runs) == len(PASSES):
            continue
        reasons = backend.not_supported_reasons(x, weight)
        if reasons:
            passed_over[name] = "cannot run this call: " + "; ".join(reasons)
        else:
            skipped = [p for p in PASSES if p not in runs]
            passed_over[name] = f"can run this call, not chosen for {', '.join(skipped)} (see 'because')"
    return PlanExplanation(plan, source, passed_over)


def plan_for(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto", *,
             explain: bool = False) -> Plan | PlanExplanation:
    """The backends ``backend`` means for this call, as a ``Plan(forward, input_grad, weight_grad)``
    (a named tuple: ``plan == ("cpu", "cpu", "cpu")`` holds).

    ``auto`` follows measurements: on the CPU, for each pass the faster of lkfast's C++ kernel and
    oneDNN, measured once per shape class on this machine and cached (``lkfast.ops.cpu_dispatch``:
    ``LKFAST_CALIBRATE=0`` uses the shipped per-instruction-set table instead); on CUDA, the
    measured table of ``lkfast.ops.cuda_table`` (see there). A named backend is used
    for all three passes. ``explain=True`` returns a ``PlanExplanation`` instead: the plan, the rule
    or table row it came from, and why each other backend was passed over (print it to read it).
    Raises ValueError for an unknown backend name, RuntimeError when the named backend cannot
    run the call (saying why, and which backends can), and the op's own ValueError/TypeError for
    inputs it refuses (an even kernel, a channel mismatch, ...).
    """
    _check_inputs(x, weight, None)
    return _plan_for(x, weight, backend, explain=explain)


def _plan_for(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto", *,
              explain: bool = False) -> Plan | PlanExplanation:
    """``plan_for`` on inputs already checked (the op's own calls, once per pass)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"depthwise_conv2d: unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if backend != "auto":
        reasons = BACKENDS[backend].not_supported_reasons(x, weight)
        if reasons:
            usable = [n for n in BACKENDS if _usable(n, x, weight)]
            raise RuntimeError(
                f"depthwise_conv2d: backend {backend!r} cannot run this call ({x.device.type}, {dtype_name(x.dtype)}): "
                + "; ".join(reasons)
                + f". Backends that can: {', '.join(usable) or 'none'} (or use backend='auto')"
            )
        plan, source = Plan.single(backend), f"backend {backend!r} was named for every pass"
    elif x.numel() == 0:
        # Nothing to compute, and nothing to measure: a calibration timed on empty tensors would be
        # kept for the non-empty calls of its shape class (an empty dimension buckets as 1).
        plan, source = Plan.single("torch"), "x is empty (a dimension of size 0): nothing to compute"
    elif x.device.type == "cpu":
        plan, source = _cpu_plan(x, weight)
    elif x.device.type == "cuda":
        plan, source = _cuda_plan(x, weight)
    else:
        plan, source = Plan.single("torch"), f"no lkfast kernel for {x.device.type} tensors: PyTorch"
    return _explain(plan, source, x, weight) if explain else plan


# ---------------------------------------------------------------------------------------------
# Registered custom ops. A schema has no tuple-of-strings type, so the plan travels as the str
# of Plan.encode and comes back with Plan.decode; or as AUTO (under torch.compile), chosen by each
# op from the tensors it runs on: a trace has symbolic shapes, and a choice made there would be
# frozen into the graph for every later shape.

AUTO = "auto"


@torch.library.custom_op("lkfast::depthwise_conv2d", mutates_args=())
def _depthwise_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], plan: str) -> torch.Tensor:
    forward = _plan_for(x, weight).forward if plan == AUTO else Plan.decode(plan).forward
    return BACKENDS[forward].forward(x, weight, bias, False)


@_depthwise_conv2d_op.register_fake
def _(x, weight, bias, plan):
    return torch.empty_like(x, memory_format=output_memory_format(x))


@torch.library.custom_op("lkfast::depthwise_conv2d_input_grad", mutates_args=())
def _input_grad_op(grad_out: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == AUTO:  # the plan of a call on tensors shaped like grad_out (x's shape)
        backend = _plan_for(grad_out, weight).input_grad
    return BACKENDS[backend].forward(grad_out, weight, None, True)


@_input_grad_op.register_fake
def _(grad_out, weight, backend):
    return torch.empty_like(grad_out, memory_format=output_memory_format(grad_out))


@torch.library.custom_op("lkfast::depthwise_conv2d_weight_grad", mutates_args=())
def _weight_grad_op(grad_out: torch.Tensor, x: torch.Tensor, kh: int, kw: int, backend: str) -> torch.Tensor:
    if backend == AUTO:  # the forward call's plan: x with a weight of its shape, dtype and device
        # (one element broadcast to that shape: plan_for reads only the weight's shape and dtype)
        backend = _plan_for(x, x.new_empty(()).expand(x.shape[1], 1, kh, kw)).weight_grad
    return BACKENDS[backend].weight_grad(grad_out, x, kh, kw)


@_weight_grad_op.register_fake
def _(grad_out, x, kh, kw, backend):
    return x.new_empty((x.shape[1], 1, kh, kw))


# FLOP counts for torch.utils.flop_counter.FlopCounterMode (which counts aten's convolutions but
# cannot see inside a custom op): PyTorch's convention (flop_counter.conv_flop_count), two per
# multiply-add, bias not counted, every tap counted whether or not it meets the image, so a model
# counts the same with its depthwise convs on lkfast's op as on F.conv2d. Each pass is one
# multiply-add per (output element, tap).
def _depthwise_flops(map_shape, kh: int, kw: int) -> int:
    n, c, h, w = map_shape
    return 2 * n * c * h * w * kh * kw


@register_flop_formula(torch.ops.lkfast.depthwise_conv2d)
def _(x_shape, weight_shape, bias_shape, plan, out_shape=None) -> int:
    return _depthwise_flops(x_shape, *weight_shape[-2:])


@register_flop_formula(torch.ops.lkfast.depthwise_conv2d_input_grad)
def _(grad_out_shape, weight_shape, backend, out_shape=None) -> int:
    return _depthwise_flops(grad_out_shape, *weight_shape[-2:])


@register_flop_formula(torch.ops.lkfast.depthwise_conv2d_weight_grad)
def _(grad_out_shape, x_shape, kh, kw, backend, out_shape=None) -> int:
    return _depthwise_flops(x_shape, kh, kw)


def _setup_context(ctx, inputs, output):
    x, weight, bias, plan = inputs
    ctx.plan = Plan.single(AUTO) if plan == AUTO else Plan.decode(plan)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad, input_grad=None, weight_grad=None):
    """The gradients (x, weight, bias, plan) of the op; ``input_grad``/``weight_grad`` compute the
    two kernels' passes: the registered ops (None), or (the eager path) the backends themselves."""
    input_grad, weight_grad = input_grad or _input_grad_op, weight_grad or _weight_grad_op
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, a Hessian-vector product): the gradients must be
        # differentiable in turn. lkfast's gradient ops have no derivative of their own; PyTorch's
        # convolution_backward has one, so the gradients go through it here.
        grad_x, grad_w = _differentiable_grads(grad, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    if ctx.needs_input_grad[0] and grad_x is None:
        grad_x = input_grad(grad, weight, ctx.plan.input_grad)
    if ctx.needs_input_grad[1] and grad_w is None:
        grad_w = weight_grad(grad, x, weight.shape[2], weight.shape[3], ctx.plan.weight_grad)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum(dim=(0, 2, 3), dtype=torch.float32 if grad.dtype != torch.float64 else None).to(grad.dtype)
    return grad_x, grad_w, grad_b, None


_depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _backend_input_grad(grad_out, weight, backend: str):
    return BACKENDS[backend].forward(grad_out, weight, None, True)


def _backend_weight_grad(grad_out, x, kh: int, kw: int, backend: str):
    return BACKENDS[backend].weight_grad(grad_out, x, kh, kw)


class _Eager(torch.autograd.Function):
    """The op without its registration, for plain eager calls (see the module's docstring): the same
    plan, backends, saved tensors and backward formula as ``torch.ops.lkfast.depthwise_conv2d``."""

    # (forward with ctx, not a separate setup_context: that form costs ~30 us more per call in
    # torch 2.14, binding the arguments through inspect.signature; torch.func, which would need it,
    # never reaches here)
    @staticmethod
    def forward(ctx, x, weight, bias, plan: Plan):
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return BACKENDS[plan.forward].forward(x, weight, bias, False)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, _backend_input_grad, _backend_weight_grad)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _eager(x, weight, bias) -> bool:
    """Whether a call may take ``_Eager``: nothing is tracing, compiling or profiling it, no
    TorchDispatchMode (FlopCounterMode, FakeTensorMode, torch.export's) or torch-function mode
    (``with torch.device(...)``) is active, and the tensors are plain ones (no subclass: DTensor,
    FakeTensor). Every one of those sees or needs the registered op."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not is_in_torch_dispatch_mode() and not torch._C._is_torch_function_mode_enabled()
            and not torch.autograd._profiler_enabled()
            and type(x) in _PLAIN_TENSORS and type(weight) in _PLAIN_TENSORS
            and (bias is None or type(bias) in _PLAIN_TENSORS))


def _needs_graph(x, weight, bias) -> bool:
    """Whether autograd records this call: grad mode is on and a tensor requires a gradient. Where it
    does not (``torch.no_grad``, ``torch.inference_mode``, tensors without ``requires_grad``: the
    evaluation's forwards), an eager call runs the forward backend directly, without
    ``_Eager.apply``: the autograd Function records nothing there, and its ``apply`` and context
    cost ~8 us of host time a call in a tight loop on a Zen 3 EPYC (more between kernels that flush
    the caches)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _differentiable_grads(grad, x, weight, want_x: bool, want_w: bool):
    if grad.numel() == 0 or not (want_x or want_w):
        return None, None  # nothing to differentiate: the ops' own (empty-safe) path
    return convolution_backward(grad, x, weight, want_x, want_w)


def _autocast(x, weight, bias):
    """The cast autocast gives F.conv2d, which a custom op does not get: under autocast on the
    inputs' device, each floating tensor other than float64 goes to the autocast dtype (as
    PyTorch's rule for its lower-precision ops; integers and float64 are left as they are). So
    the output's dtype is autocast's whichever backend computes it."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    if device_type is None:
        return x, weight, bias
    # (asked only of other devices, "meta" among them: torch 2.11's dynamo cannot trace the question)
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return x, weight, bias
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible and t.device.type == device_type else t
    return cast(x), cast(weight), cast(bias)


def _forward_ad_dual(*tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent (torch.autograd.forward_ad)."""
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:  # no dual level open: the common case, one attribute read
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _under_torch_func(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    # torch.func wraps tensors in levels (batched, dual, grad-tracking) that lkfast's kernels cannot
    # read and the custom op has no vmap or forward-mode rule for (vmap also refuses the random
    # tensors a first calibration times); PyTorch's convolution supports every transform. Dual
    # tensors of torch.autograd.forward_ad come here too (the op would drop their tangents).
    if backend not in ("auto", "torch"):
        raise RuntimeError(f"depthwise_conv2d: backend {backend!r} cannot run under torch.func transforms "
                           f"(vmap, grad, jvp, jacrev...) or on forward-mode dual tensors; use backend='auto' "
                           f"or 'torch', which compute with F.conv2d there")
    kh, kw = weight.shape[-2:]
    if x.shape[1] == 1 and x.device.type == "cpu":
        # one channel is a plain (groups = 1) convolution to oneDNN, whose weight gradient (taken by grad,
        # vjp, jacrev, hessian) corrupts the heap when the kernel reaches past the map's rows: computed as
        # a two-channel depthwise one and the first channel kept, as backends.convolution_backward does
        x, weight = x.expand(-1, 2, -1, -1), weight.expand(2, -1, -1, -1)
        bias = None if bias is None else bias.expand(2)
        return torch.nn.functional.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=2)[:, :1]
    return torch.nn.functional.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     backend: str = "auto") -> torch.Tensor:
    """Depthwise 2-D convolution, stride 1, zero "same" padding: ``F.conv2d(x, weight, bias,
    padding=(kh // 2, kw // 2), groups=C)``, computed by the fastest correct backend.

    x: ``(N, C, H, W)`` in any memory format (the output has the same one: channels_last in,
    channels_last out). weight: ``(C, 1, kh, kw)`` with odd kh, kw (square or not, any size).
    bias: ``(C,)`` or None. float32, float16, bfloat16 or float64, all three on one device.
    Differentiable in x, weight and bias, to any order (with ``create_graph=True`` the gradients are
    computed by PyTorch's differentiable ``convolution_backward``). ``backend``: "auto", "torch", "cpu", "cuda", "triton" or
    "triton_mma" (tensor cores, fp16/bf16); ``lkfast.ops.available_backends()`` lists which can run
    here and why the others cannot.
    Under ``torch.func`` transforms (vmap, grad, jvp, jacrev, hessian...) and on forward-mode dual
    tensors (``torch.autograd.forward_ad``) ``auto`` and "torch" compute with ``F.conv2d``, which
    supports them; the other backends cannot run there (RuntimeError).
    Under autocast the inputs are cast as F.conv2d's would be (floating tensors other than float64
    to the autocast dtype), whichever backend runs.
    Raises ValueError/TypeError for bad shapes, dtypes or devices and RuntimeError when the named
    backend cannot run the call, each naming the problem.
    """
    x, weight, bias = _autocast(x, weight, bias)
    _check_inputs(x, weight, bias)
    if backend == "auto" and torch.compiler.is_compiling():
        return _depthwise_conv2d_op(x, weight, bias, AUTO)  # each op chooses when it runs (see AUTO)
    if torch._C._are_functorch_transforms_active() or _forward_ad_dual(x, weight, bias):
        return _under_torch_func(x, weight, bias, backend)
    plan = _plan_for(x, weight, backend)
    if _eager(x, weight, bias):
        if not _needs_graph(x, weight, bias):  # inference: no graph to record, the backend alone
            return BACKENDS[plan.forward].forward(x, weight, bias, False)
        return _Eager.apply(x, weight, bias, plan)
    return _depthwise_conv2d_op(x, weight, bias, plan.encode())

"""Backends of the depthwise convolution and what each can run.

Every backend computes the same three things for stride 1, zero "same" padding and odd kernels:
``forward(x, weight, bias, flip)`` (``flip`` rotates the kernel by 180 degrees, which turns the
forward pass into the input gradient) and ``weight_grad(grad_out, x, kh, kw)``. A backend says why
it cannot run (``unavailable_reason`` for the whole machine, ``not_supported_reasons`` for one call),
in the style of xformers' operator registry.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from lkfast import _ext

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype as users write it: ``float16`` for ``torch.float16``."""
    return str(dtype).removeprefix("torch.")


# os.environ.get encodes the name and decodes the value on every read: ~0.7 us idle and ~3 us
# inside an op call (measured), and every auto call reads several variables (the CPU
# calibration's settings, the CUDA table's path): most of auto's host time over a named backend on
# the CPU. CPython's os.environ keeps its state in the dict ``_data`` under encoded names (every
# write to os.environ goes through it, so monkeypatch.setenv and os.environ[...] = ... are seen at
# once); reading that dict answers the same question without the conversions. Elsewhere (another
# Python), os.environ.get.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODED_NAMES: dict = {}


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, read from os.environ's own dict where CPython has one."""
    if not isinstance(_ENVIRON_DATA, dict):
        return os.environ.get(name, default)
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = os.environ.encodekey(name)
    value = _ENVIRON_DATA.get(key)
    return default if value is None else os.environ.decodevalue(value)


class Plan(NamedTuple):
    """The backend of each of the three passes of one call; a plain tuple
    ``(forward, input_grad, weight_grad)`` compares equal to it."""

    forward: str
    input_grad: str
    weight_grad: str

    @classmethod
    def single(cls, name: str) -> "Plan":
        """One backend for every pass."""
        return cls(name, name, name)

    def encode(self) -> str:
        """The plan as the ``str`` argument of the registered custom op (its schema takes no
        tuples of strings); ``Plan.decode`` reverses it. The only place that knows the format."""
        # (not ",".join(self): torch 2.11's dynamo cannot iterate a named tuple inside str.join)
        return f"{self.forward},{self.input_grad},{self.weight_grad}"

    @classmethod
    def decode(cls, text: str) -> "Plan":
        forward, input_grad, weight_grad = text.split(",")
        return cls(forward, input_grad, weight_grad)


def remembered(memo: dict, key, source, compute: Callable[[], object]):
    """``compute()``, kept in ``memo`` under ``key`` for as long as ``source`` (what the answer was
    computed from: a calibration's generation, a measured table) stays the same (``==``); computed
    afresh each time when ``source`` is None (nothing to remember against). For the backend
    choices the op asks on every call: for one source the answer for a key cannot change, and
    working it out again costs as much as a small layer's kernel. Up to 4096 keys: many distinct
    shapes (varying image sizes) start it over."""
    if source is None:
        return compute()
    hit = memo.get(key)
    if hit is not None and hit[0] == source:
        return hit[1]
    result = compute()
    if len(memo) >= 4096:
        memo.clear()
    memo[key] = (source, result)
    return result


PASSES: tuple[str, ...] = Plan._fields  # ("forward", "input_grad", "weight_grad")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout every backend returns for input ``x``: channels_last in, channels_last out."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


class Backend:
    name: str = ""
    device_types: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    description: str = ""

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None when it can."""
        return None

    def not_supported_reasons(self, x: torch.Tensor, weight: torch.Tensor) -> list[str]:
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if x.device.type not in self.device_types:
            reasons.append(f"runs on {'/'.join(self.device_types)} tensors, got {x.device.type}")
        if x.dtype not in self.dtypes:
            names = ", ".join(dtype_name(d) for d in self.dtypes)
            reasons.append(f"supports {names}, got {dtype_name(x.dtype)}")
        return reasons

    def forward(self, x, weight, bias=None, flip=False):  # pragma: no cover - interface
        raise NotImplementedError

    def weight_grad(self, grad_out, x, kh, kw):  # pragma: no cover - interface
        raise NotImplementedError


class TorchBackend(Backend):
    """PyTorch's own convolution, run in its fastest layout: on the CPU oneDNN's channels_last kernel
    for a channels_last input, and for any other input whichever of channels_last (a copy) and the
    input's own NCHW layout this machine's calibration measured faster for the forward
    (``lkfast.ops.cpu_dispatch.torch_forward_layout``)."""

    name = "torch"
    device_types = ("cpu", "cuda")
    description = "torch.nn.functional.conv2d (oneDNN on the CPU, in the layout measured faster; cuDNN/native on CUDA)"

    @staticmethod
    def _layout(x):
        if x.device.type == "cpu":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @staticmethod
    def forward_hangs_in_channels_last(x, kw: int) -> bool:
        """oneDNN's bf16 channels_last depthwise forward (oneDNN 3.12 in torch 2.14, its AVX512-BF16
        kernel; measured on the Zen 5) does not return for 2 to 16 channels and kernels 15 or more
        wide on maps from about 32 wide: x (1, 16, 32, 32) with a 15x15 kernel ran > 5 minutes, (1,
        16, 56, 56) at 31x31 more than 4 (NCHW: 0.03 and 0.06 s; 1 or 17+ channels, kernels up to 13
        wide, 15 tall but 3 wide, fp32 and fp16: milliseconds). Those forwards (and the input
        gradients, forwards too) run in NCHW. The weight gradient is not affected (and NCHW's hangs
        at (2, 8, 64, 64), 51x51: it stays channels_last)."""
        return x.device.type == "cpu" and x.dtype == torch.bfloat16 and 2 <= x.shape[1] <= 16 and kw >= 15

    @classmethod
    def cpu_forward_layouts(cls, x, kw: int) -> tuple[str, ...]:
        """The layouts ("channels_last", "nchw") PyTorch's CPU forward of ``x`` may run in: a
        channels_last input stays so; another input runs as a channels_last copy or as it is
        (NCHW), the two measured by the calibration. PyTorch's NCHW path can be the faster: bf16 at
        ConvNeXt-T's 7x7 shapes and RepLKNet-31B's stage 4, batch 8, on the Zen 5, it ran 1.1-2.8x
        the channels_last copy and 1.0-1.4x lkfast's kernel, where at 27-31 wide kernels it ran 30-42x
        slower than the copy (benchmarks/results/cpu_calibration_nchw_zen5.json). "nchw" alone where
        oneDNN's channels_last kernel would hang (``forward_hangs_in_channels_last``)."""
        if cls.forward_hangs_in_channels_last(x, kw):
            return ("nchw",)
        if output_memory_format(x) == torch.channels_last:
            return ("channels_last",)
        return ("channels_last", "nchw")

    def forward(self, x, weight, bias=None, flip=False):
        layout = None  # CUDA: the input as it is
        if x.device.type == "cpu" and x.numel():
            layouts = self.cpu_forward_layouts(x, weight.shape[-1])
            if len(layouts) == 1:
                layout = layouts[0]
            else:
                from lkfast.ops import cpu_dispatch  # (it imports this module)

                layout = cpu_dispatch.torch_forward_layout(x, weight)
        return self.forward_in(layout, x, weight, bias, flip)

    @staticmethod
    def forward_in(layout: str | None, x, weight, bias=None, flip=False):
        """The forward with ``x`` copied to ``layout`` ("channels_last", "nchw"; None: as it is)
        first; the result in ``output_memory_format(x)``."""
        if x.numel() == 0:  # F.conv2d refuses C = 0 (groups = 0) and an empty map (H or W = 0)
            return torch.empty_like(x, memory_format=output_memory_format(x))
        if flip:
            weight = weight.flip(-1, -2)
        kh, kw = weight.shape[-2:]
        x_in = x if layout is None else x.contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        y = F.conv2d(x_in, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])
        return y.contiguous(memory_format=output_memory_format(x))

    def weight_grad(self, grad_out, x, kh, kw):
        C = x.shape[1]
        if x.numel() == 0:  # nothing summed (and convolution_backward refuses C = 0, H or W = 0)
            return x.new_zeros((C, 1, kh, kw))
        weight = x.new_empty(1).expand(C, 1, kh, kw)  # only its shape is read
        return convolution_backward(grad_out, x, weight, False, True, layout=self._layout)[1].contiguous()


def convolution_backward(grad_out, x, weight, want_x: bool, want_w: bool, layout=None):
    """(input gradient, weight gradient) of the depthwise convolution (stride 1, zero "same"
    padding) by PyTorch's ``aten.convolution_backward``, None for the one not wanted;
    differentiable in turn (the path of ``create_graph=True``). ``layout(t)``, when given, is
    applied to ``grad_out`` and ``x`` just before the call (the torch backend's channels_last).

    One channel on the CPU with the weight gradient wanted is computed twice, as a two-channel
    depthwise convolution, and the first channel's gradients returned: one channel is a plain
    (groups = 1) convolution to oneDNN, whose weight gradient corrupts the heap when the kernel
    reaches far past the map's rows (torch 2.14: x (1, 1, 13, 23) with a 31x13 kernel, a segfault
    or a glibc abort); its depthwise path is fine."""
    kh, kw = weight.shape[-2:]
    channels = x.shape[1]
    if channels == 1 and x.device.type == "cpu" and want_w:
        grad_out, x, weight = grad_out.expand(-1, 2, -1, -1), x.expand(-1, 2, -1, -1), weight.expand(2, -1, -1, -1)
    if layout is not None:
        grad_out, x = layout(grad_out), layout(x)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], x.shape[1],
        [want_x, want_w, False])
    if x.shape[1] != channels:
        grad_x = grad_x[:, :1] if grad_x is not None else None
        grad_w = grad_w[:1] if grad_w is not None else None
    return grad_x, grad_w


class _CompiledBackend(Backend):
    """Kernels compiled into lkfast._C, bound as ``<prefix>_forward`` and ``<prefix>_weight_grad``."""

    prefix = ""

    def unavailable_reason(self):
        return _ext.load_error

    def forward(self, x, weight, bias=None, flip=False):
        y = getattr(_ext._C, f"{self.prefix}_forward")(x, weight, bias, flip)
        return y.contiguous(memory_format=output_memory_format(x))

    def weight_grad(self, grad_out, x, kh, kw):
        return getattr(_ext._C, f"{self.prefix}_weight_grad")(grad_out, x, kh, kw)


class CpuBackend(_CompiledBackend):
    """lkfast's C++ kernels (OpenMP, AVX-512/AVX2 chosen at run time)."""

    name = prefix = "cpu"
    device_types = ("cpu",)
    description = "lkfast C++ kernels (lkfast._C)"


@functools.lru_cache(maxsize=16)
def _smem_optin(index: int) -> int | None:
    """The opt-in shared memory per block of CUDA device ``index`` (None: torch does not say). Called
    with a CUDA tensor's ``device.index``, which torch always sets (cached per index: a bare "cuda"
    would be whichever device was current at the first call)."""
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


class CudaBackend(_CompiledBackend):
    """lkfast's CUDA kernels, compiled into lkfast._C when nvcc and a CUDA torch were present."""

    name = prefix = "cuda"
    device_types = ("cuda",)
    description = "lkfast CUDA kernels (lkfast._C)"

    def unavailable_reason(self):
        if _ext.load_error:
            return _ext.load_error
        if not getattr(_ext._C, "with_cuda", False):
            return "lkfast._C was built without CUDA (no nvcc or a CPU-only torch at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None

    def not_supported_reasons(self, x, weight):
        """Besides the device and dtype: why one of the kernels would refuse this call at launch
        (shared memory per block over the device's opt-in limit, more tiles than a grid row takes,
        too many weight-gradient items for their int counters), checked for every kernel of both
        layouts (the input gradient's layout is grad_out's, not x's), so that ``auto`` passes the
        backend over with the reason instead of meeting the RuntimeError from inside the op. The
        rule is the kernels' own (csrc/cuda/dwconv_cuda_limits.h, lkfast._C.cuda_launch_refusal)."""
        reasons = super().not_supported_reasons(x, weight)
        if reasons or x.dim() != 4 or weight.dim() != 4:
            return reasons
        why = _ext._C.cuda_launch_refusal(list(x.shape), weight.shape[2], weight.shape[3], x.dtype,
                                          _smem_optin(x.device.index))
        return [why] if why else []


class TritonBackend(Backend):
    """Triton kernels from lkfast.kernels (on the CPU only under TRITON_INTERPRET=1)."""

    name = "triton"
    device_types = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    description = "Triton kernels (lkfast.kernels)"
    module_name = "lkfast.kernels.depthwise"

    @functools.cached_property
    def _module(self):
        try:
            return importlib.import_module(self.module_name), None
        except Exception as exc:  # triton missing, or the kernels module not installed
            return None, f"{self.module_name} cannot be imported ({type(exc).__name__}: {exc})"

    def unavailable_reason(self):
        module, error = self._module
        if module is None:
            return error
        return module.unavailable_reason()

    def not_supported_reasons(self, x, weight):
        reasons = super().not_supported_reasons(x, weight)
        module, _ = self._module
        if module is not None and module.interpreted():
            # The interpreter runs the kernels on CPU tensors.
            reasons = [r for r in reasons if not r.startswith("runs on")]
        return reasons

    def forward(self, x, weight, bias=None, flip=False):
        y = self._module[0].forward(x, weight, bias, flip)
        return y.contiguous(memory_format=output_memory_format(x))

    def weight_grad(self, grad_out, x, kh, kw):
        return self._module[0].weight_grad(grad_out, x, kh, kw)


class TritonMmaBackend(TritonBackend):
    """The tensor-core Triton formulation (lkfast.kernels.depthwise_mma: banded per-kernel-row
    ``tl.dot``, a dense per-channel product on maps no larger than the kernel), fp16/bf16 only.
    ``auto`` takes it only from a row of the measured CUDA table where it won (lkfast.ops.cuda_table:
    on an H200 it won most fp16/bf16 passes; it is not in the unmeasured default order)."""

    name = "triton_mma"
    dtypes = (torch.float16, torch.bfloat16)
    description = "Triton tensor-core kernels (lkfast.kernels.depthwise_mma), fp16/bf16"
    module_name = "lkfast.kernels.depthwise_mma"


BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), CpuBackend(), CudaBackend(), TritonBackend(),
                                                    TritonMmaBackend())}
NAME_WIDTH = max(len(name) for name in BACKENDS)  # explanations pad backend names to this


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not, when unavailable; what it is, when available
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]

    def __str__(self):
        state = "available" if self.available else "unavailable"
        return f"{self.name:{NAME_WIDTH}s} {state:11s} {self.reason}"


def available_backends() -> dict[str, BackendInfo]:
    """Every backend, whether it can run here, and why not when it cannot."""
    out = {}
    for name, backend in BACKENDS.items():
        why = backend.unavailable_reason()
        detail = backend.description
        if name == "cpu" and why is None:
            detail += f", {_ext._C.cpu_isa()} path"
            note = _ext._C.cpu_isa_note() if hasattr(_ext._C, "cpu_isa_note") else ""
            if note:
                detail += f" ({note})"
        if name in ("cpu", "cuda") and why is None and _ext.stale:
            detail += f"; STALE BUILD: {_ext.stale}"
        out[name] = BackendInfo(
            name=name,
            available=why is None,
            reason=why or detail,
            devices=backend.device_types,
            dtypes=tuple(dtype_name(d) for d in backend.dtypes),
        )
    return out

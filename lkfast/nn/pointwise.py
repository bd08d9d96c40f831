"""1x1 convolutions as matrix products on the CPU, where this machine measured that faster.

A 1x1, stride-1, unpadded, ungrouped convolution of a channels_last tensor is a matrix product:
the tensor's memory already is the (N*H*W, C_in) matrix. ``F.linear`` on that view uses the
weight as it is, where oneDNN's convolution reorders the weight into its blocked layout on every
call, forward and backward (ONEDNN_VERBOSE shows a reorder before each 1x1 convolution in eager
mode). On small maps the weight is the bigger operand (RepLKNet-31B's stage 3: 512x2048 weights,
14x14 maps), so the reorder can cost as much as the product. Whether the product wins depends on
the CPU and its matrix-product library, so it is measured, not assumed:
- on the AVX-512 development Xeon (benchmarks/results/models_cpu.md) the input-gradient step of
  RepLKNet-31B with BNs folded ran ~1.16x faster with the product on maps of at most 14x14, and
  the product was slower on 28x28 and 56x56 maps (0.82-0.94x), hence ``MAX_AREA``;
- on a Zen 4 EPYC the product (MKL's SGEMM) ran at 0.71-0.91x of oneDNN's 1x1 convolution at
  RepLKNet-31B's small-map shapes (forward and forward + input gradient).
So for an eligible input (``eligible``: CPU, fp32/fp64, channels_last, at most ``MAX_AREA`` pixels,
autocast off, outside ``torch.func`` transforms) the choice comes from the machine's calibration (``cpu_dispatch.choose_pointwise``,
cached beside the depthwise op's choices; ``pointwise_choice`` says which and why), the forward's
for a call under no_grad, the forward's with the backward for a call whose backward will run; without
calibration (``LKFAST_CALIBRATE=0``, ``torch.compile``) it is PyTorch's convolution.
``LKFAST_POINTWISE=matmul`` or ``=conv`` forces one of the two (default ``auto``).

The same choice, seen from the other side: an ``nn.Linear`` on activations (ConvNeXt's MLPs on NHWC
maps, timm's default ``conv_mlp=False``; a ViT's linears on (N, L, C) tokens) is a 1x1 convolution
of a channels_last view of the same memory. PyTorch sends ``F.linear`` to its BLAS (MKL), which on
the AMD EPYC Zen 5 ran ConvNeXt-T's eight MLP shapes at 95-215 GFLOP/s, where oneDNN's 1x1
convolution on the same memory ran them and ViT-B's four block linears 1.38-2.20x faster forward
and 1.36-2.05x faster in a training step (benchmarks/results/pointwise_linear_zen5.md; the whole
ConvNeXt-T patched: inference 1.57x, training 1.75x). ``pointwise_linear`` / ``PointwiseLinear``
(what ``patch_model`` makes of an ``nn.Linear``) ask the same calibration, under the same key, for
a contiguous 2-D, 3-D or 4-D CPU fp32/fp64 input of any size (``linear_eligible``, ``_conv_view``):
the area limit above guards the move to the matrix product, which the Xeon's training step showed
losing on large maps, not the move away from it. A call whose backward will run is measured with
that backward, under entries of its own (capped to AVX2, the convolution won ViT-B's forward and
lost its training step). Without calibration, and for every other input (autocast, other
devices), it is PyTorch's own ``F.linear``.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from lkfast.nn.depthwise import _pair, refuse_scripting

MAX_AREA = 14 * 14  # maps of at most this many pixels take the matrix product (see above)
MATMUL_DTYPES = (torch.float32, torch.float64)


MODES = ("auto", "matmul", "conv")


def _mode() -> str:
    mode = os.environ.get("LKFAST_POINTWISE", "auto")
    if mode not in MODES:
        raise ValueError(f"LKFAST_POINTWISE={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def eligible(x: torch.Tensor) -> bool:
    """Whether the matrix product is a candidate for this input (see the module docstring). Never
    under ``torch.func`` transforms: vmap cannot query a channels_last layout nor draw the random
    tensors a first calibration times; PyTorch's convolution supports every transform."""
    if torch._C._are_functorch_transforms_active():
        return False
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in MATMUL_DTYPES and x.numel() > 0
            and x.shape[2] * x.shape[3] <= MAX_AREA
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu"))


_NOT_A_CANDIDATE = ("not a candidate for the matrix product (needs a non-empty CPU fp32/fp64 channels_last map of "
                    f"at most {MAX_AREA} pixels, autocast off, no torch.func transform)")
_MEMO: dict = {}  # ([layer,] x shape, weight shape, dtype, grads) -> (cpu_dispatch.choices_token, Choice)


def _fixed_choice(candidate: bool, own: str, not_a_candidate: str):
    """The choice when no measurement is needed, else None: the layer's ``own`` op ("conv" for a
    convolution, "matmul" for a linear) when the input is not a ``candidate``, the forced one when
    LKFAST_POINTWISE forces one."""
    from lkfast.ops.cpu_dispatch import Choice

    if not candidate:
        return Choice(own, not_a_candidate)
    mode = _mode()
    return None if mode == "auto" else Choice(mode, f"LKFAST_POINTWISE={mode}")


def _grads_needed(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which gradients the call's backward will compute: "" (none: no_grad, inference_mode, nothing
    requiring grad), "x", "w" or "xw" (the bias's, a sum over the output, costs the same both ways)."""
    if not torch.is_grad_enabled():
        return ""
    return ("x" if x.requires_grad else "") + ("w" if weight.requires_grad else "")


def pointwise_choice(x: torch.Tensor, weight: torch.Tensor):
    """How ``pointwise_conv2d(x, weight)`` is computed, with the reason: a
    ``cpu_dispatch.Choice`` whose backend is "matmul" or "conv". A call whose backward will run is
    measured with that backward (``_grads_needed``), as ``linear_choice``'s. Asked on every call:
    the measured answer is remembered per shape while the calibration stays the same."""
    from lkfast.ops import cpu_dispatch

    fixed = _fixed_choice(eligible(x) and weight.dtype == x.dtype, "conv", _NOT_A_CANDIDATE)
    if fixed is not None:
        return fixed
    grads = _grads_needed(x, weight)
    args = (tuple(x.shape), tuple(weight.shape), x.dtype, grads)
    return cpu_dispatch.remembered(_MEMO, args, lambda: cpu_dispatch.choose_pointwise(x, weight, grads=grads))


def takes_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``pointwise_conv2d(x, weight)`` computes this input as a matrix product."""
    return pointwise_choice(x, weight).backend == "matmul"


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a (C_out, C_in, 1, 1) weight, stride 1, no padding: where
    ``pointwise_choice`` says "matmul", ``F.linear`` on the NHWC view (the result is channels_last
    too); otherwise ``F.conv2d``. Differentiable in all three."""
    if weight.shape[2:] != (1, 1):
        raise ValueError(f"pointwise_conv2d: weight must be (C_out, C_in, 1, 1), got {tuple(weight.shape)}")
    if takes_matmul(x, weight):
        out = F.linear(x.permute(0, 2, 3, 1), weight.reshape(weight.shape[0], weight.shape[1]), bias)
        return out.permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)


LINEAR_DIMS = (2, 3, 4)  # the input dimensions pointwise_linear views as a 1x1 convolution (see _conv_view)


def linear_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` is a candidate for the 1x1 convolution: a contiguous 2-D, 3-D
    or 4-D CPU fp32/fp64 input (features, tokens, NHWC activations: a channels_last view of it is
    the convolution's input, no copy; see ``_conv_view``) with a weight of its dtype and features,
    not empty (no convolution of a 0-pixel map), autocast off, outside ``torch.func`` transforms (as
    ``eligible``). Any other input is ``F.linear``'s, with its own errors."""
    if torch._C._are_functorch_transforms_active():
        return False
    return (x.device.type == "cpu" and x.dim() in LINEAR_DIMS and x.dtype in MATMUL_DTYPES and x.numel() > 0
            and weight.dtype == x.dtype and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and x.is_contiguous() and not torch.is_autocast_enabled("cpu"))


_NOT_A_LINEAR_CANDIDATE = ("not a candidate for the 1x1 convolution (needs a non-empty contiguous 2-D, 3-D or "
                           "4-D CPU fp32/fp64 input with a weight of its dtype and features, autocast off, no "
                           "torch.func transform)")


def _conv_view(x: torch.Tensor) -> torch.Tensor:
    """The (N, C, H, W) channels_last view of a contiguous (..., C) input, over the same memory:
    NHWC activations (N, H, W, C) as they are, tokens (N, L, C) as an L x 1 map, features (M, C) as
    one M x 1 map. Not (M, 1, 1, C): oneDNN ran ViT-B's linears as M 1x1 images 2x slower than
    F.linear on the Zen 5, as one M x 1 image 2.1-2.3x faster."""
    if x.dim() == 3:
        x = x.unsqueeze(2)
    elif x.dim() == 2:
        x = x.unsqueeze(0).unsqueeze(2)
    return x.permute(0, 3, 1, 2)


def linear_choice(x: torch.Tensor, weight: torch.Tensor):
    """How ``pointwise_linear(x, weight)`` is computed, with the reason: "matmul" (``F.linear``,
    PyTorch's own) or "conv" (the 1x1 convolution of the channels_last view ``_conv_view(x)``).
    The calibrated answer is the one ``pointwise_choice`` gives the same product asked as a
    convolution of that view (one cache entry for both) when no gradient will be computed; a call
    whose backward will run is measured with that backward (``_grads_needed``: an attack step's
    input gradient, a training step's weight gradient), under entries of its own, since the two
    can disagree. Without calibration it is "matmul"."""
    from lkfast.ops import cpu_dispatch

    fixed = _fixed_choice(linear_eligible(x, weight), "matmul", _NOT_A_LINEAR_CANDIDATE)
    if fixed is not None:
        return fixed
    grads = _grads_needed(x, weight)
    # keyed by the input's own shape: the view is made only when the memo has no answer (asked on
    # every call; pointwise_linear makes the one it computes with)
    args = ("linear", tuple(x.shape), tuple(weight.shape), x.dtype, grads)
    return cpu_dispatch.remembered(_MEMO, args, lambda: cpu_dispatch.choose_pointwise(
        _conv_view(x), weight[:, :, None, None], uncalibrated="matmul", grads=grads))


def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; where ``linear_choice`` says "conv", computed as
    ``F.conv2d`` of the channels_last view ``_conv_view(x)`` with the weight as (out, in, 1, 1),
    and the result (channels_last) viewed back as the contiguous (..., out) tensor ``F.linear``
    returns. Differentiable either way."""
    if linear_choice(x, weight).backend != "conv":
        return F.linear(x, weight, bias)
    out = F.conv2d(_conv_view(x), weight[:, :, None, None], bias).permute(0, 2, 3, 1)
    # a view where the convolution's output is channels_last (PyTorch 2.14 keeps the input's layout,
    # also where size-1 dimensions leave it ambiguous), a copy otherwise: contiguous as F.linear's
    return out.reshape(*x.shape[:-1], weight.shape[0])


class PointwiseLinear(nn.Linear):
    """``nn.Linear(in_features, out_features, bias=bias)`` (same parameters and state_dict) that
    runs ``pointwise_linear``: what ``patch_model`` makes of a plain ``nn.Linear``."""

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_scripting(self, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_linear(x, self.weight, self.bias)


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1, bias=bias)`` (same parameters and state_dict) that
    runs ``pointwise_conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_scripting(self)  # (unpatch_model leaves it: RepLKNet's own layer, no patched nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv2d(x, self.weight, self.bias)


def is_pointwise(kernel_size, stride, padding, groups) -> bool:
    """Whether a conv with these arguments is a plain 1x1 one (stride 1, no padding, ungrouped):
    what ``PointwiseConv2d`` computes, and what a BN before it can be folded into exactly."""
    return _pair(kernel_size) == (1, 1) and _pair(stride) == (1, 1) and _pair(padding) == (0, 0) and groups == 1


__all__ = ["PointwiseConv2d", "pointwise_conv2d", "pointwise_choice", "takes_matmul", "eligible", "is_pointwise",
           "PointwiseLinear", "pointwise_linear", "linear_choice", "linear_eligible", "MAX_AREA", "LINEAR_DIMS"]

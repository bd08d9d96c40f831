"""The generic drop-in: ``DepthwiseConv2d`` and the one rule saying which convolutions it can replace.

    fast_op_computes(...)    the rule: a conv the fast op computes exactly and is worth it for
    DepthwiseConv2d          drop-in for nn.Conv2d(c, c, k, padding=k // 2, groups=c)
    make_conv2d(...)         DepthwiseConv2d where the rule allows, nn.Conv2d otherwise
    DEFAULT_MIN_KERNEL_SIZE  smallest kernel side the fast op is used for by default

``patch_model`` (lkfast/nn/patch.py) asks the same rule of every ``nn.Conv2d`` in a model.
"""
from __future__ import annotations

import operator
from typing import Union

import torch
import torch.nn as nn

from lkfast.ops import depthwise_conv2d

KernelSize = Union[int, tuple]

# Smallest kernel side the fast op is used for by default. Measured on the CPU (2 cores, fp32,
# 8 x 96 x 56 x 56): from 5x5 up the fast op wins clearly once gradients are involved (PyTorch's
# weight gradient is the slow part) and in NCHW; at 3x3 PyTorch is as fast, so 3x3 stays nn.Conv2d.
DEFAULT_MIN_KERNEL_SIZE = 5


def _pair(size) -> tuple[int, int]:
    """(kh, kw) of an int or a pair of ints (numpy's too); ValueError for anything else."""
    try:
        pair = (operator.index(size),) * 2 if not isinstance(size, (tuple, list)) else tuple(map(operator.index, size))
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"kernel_size must be an int or a pair of ints (kh, kw), got {size!r}")
    return pair


def fast_op_computes(in_channels: int, out_channels: int, kernel_size: KernelSize, stride=1, padding=None,
                     dilation=1, groups: int = 1, padding_mode: str = "zeros",
                     min_kernel_size: int = DEFAULT_MIN_KERNEL_SIZE) -> bool:
    """True when ``nn.Conv2d`` with these arguments is a convolution the fast op computes exactly
    and is used for: depthwise (groups == in == out channels), stride 1, dilation 1, zero padding of
    k // 2 on each side (``None``, "same", an int or a pair), an odd kernel in both dimensions with
    its larger side at least ``min_kernel_size``. False for anything else (never raises)."""
    kh, kw = _pair(kernel_size)
    if not (groups == in_channels == out_channels) or padding_mode != "zeros":
        return False
    if _pair(stride) != (1, 1) or _pair(dilation) != (1, 1):
        return False
    if kh % 2 == 0 or kw % 2 == 0 or max(kh, kw) < min_kernel_size:
        return False
    return padding is None or padding == "same" or (not isinstance(padding, str) and _pair(padding) == (kh // 2, kw // 2))


def refuse_scripting(module: nn.Module, plain=None):
    """A fast layer's ``__prepare_scriptable__``: ``torch.jit.script`` cannot compile the fast ops
    (custom ops with Python dispatch) and failed inside them with a parser error naming neither the
    layer nor the way out. (Returning the ``plain`` layer instead would script, but TorchScript puts
    what this returns into the parent's modules: the user's model would silently lose its fast
    layers.) ``plain``: the PyTorch class ``unpatch_model`` turns the layer into, if it does."""
    name = type(module).__name__
    way = (f"call lkfast.nn.unpatch_model(model) first (it makes the layer the nn.{plain.__name__} it is "
           f"equivalent to, same tensors; to keep the fast model, unpatch and script a copy.deepcopy of it), "
           f"or use torch.compile or torch.export, which trace lkfast's ops") if plain is not None else \
        "use torch.compile or torch.export, which trace lkfast's ops"
    raise RuntimeError(f"torch.jit.script cannot compile lkfast's {name} (its op is no TorchScript): {way}")


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise convolution, stride 1, zero "same" padding, computed by the fast op.

    A subclass of ``nn.Conv2d(channels, channels, kernel_size, padding=k // 2, groups=channels)`` with
    the same parameters and state_dict keys (``weight`` of shape ``(C, 1, kh, kw)``, ``bias``), so a
    Conv2d's state_dict loads into it and code that reads ``in_channels``/``kernel_size``/``weight``
    keeps working. Refuses (ValueError) a kernel size that is even in either dimension (the padding
    is symmetric only for odd sizes). A padding, stride, dilation or padding_mode changed on the
    module after construction is computed as nn.Conv2d computes it, by PyTorch. Holds no state beyond nn.Conv2d's: ``patch_model`` turns an
    eligible ``nn.Conv2d`` into one by changing its class. A ``weight`` (or ``bias``) of another
    shape than the module's, as an unsafe parametrization may compute, is convolved as nn.Conv2d
    would, by PyTorch.
    """

    def __init__(self, channels: int, kernel_size: KernelSize, bias: bool = True, device=None, dtype=None):
        try:
            kh, kw = _pair(kernel_size)
        except ValueError as error:
            raise ValueError(f"DepthwiseConv2d: {error}") from None
        if kh % 2 == 0 or kw % 2 == 0 or kh < 1 or kw < 1:
            raise ValueError(f"DepthwiseConv2d: kernel size must be odd in both dimensions, got {kh}x{kw}; "
                             f"use nn.Conv2d for even kernels")
        super().__init__(channels, channels, (kh, kw), stride=1, padding=(kh // 2, kw // 2), groups=channels,
                         bias=bias, device=device, dtype=dtype)

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_scripting(self, nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each read once, as nn.Conv2d's forward reads them: under torch.nn.utils.parametrize a read
        # computes the tensor (and spectral_norm's runs a power iteration in training).
        weight, bias = self.weight, self.bias
        channels = self.out_channels
        kh, kw = self.kernel_size
        if weight.shape != (channels, 1, kh, kw) or (bias is not None and bias.shape != (channels,)) \
                or self.padding not in ((kh // 2, kw // 2), "same") or self.stride != (1, 1) or self.dilation != (1, 1) \
                or self.padding_mode != "zeros" or self.groups != channels:
            # a weight of another shape (an unsafe parametrization's, one assigned by hand), or a
            # padding, stride, dilation or padding mode set after construction: the fast op computes
            # none of these, so compute what nn.Conv2d does with them
            return self._conv_forward(x, weight, bias)
        if x.dim() not in (3, 4):
            raise ValueError(f"DepthwiseConv2d: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, "
                             f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        if x.shape[-3] != channels:  # the input is what is wrong here (the op's message would blame the weight)
            raise RuntimeError(f"DepthwiseConv2d({channels} channels): expected input{list(x.shape)} to have "
                               f"{channels} channels, but got {x.shape[-3]} channels instead")
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it; the op itself takes (N, C, H, W)
            return depthwise_conv2d(x.unsqueeze(0), weight, bias).squeeze(0)
        return depthwise_conv2d(x, weight, bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A new DepthwiseConv2d sharing ``conv``'s parameters (same tensors, device and dtype); not
        its hooks. Refuses (ValueError) a conv whose ``weight`` or ``bias`` is not a parameter of
        its own (``weight_norm``, ``spectral_norm``, pruning compute it in a hook): ``patch_model``
        patches such a conv in place, hooks included; and (ValueError, naming what differs) a conv the
        fast op does not compute (``fast_op_computes`` with any odd kernel size: a strided, dilated,
        unpadded or reflect-padded conv would silently give other outputs)."""
        if not fast_op_computes(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation, conv.groups, conv.padding_mode, min_kernel_size=1):
            raise ValueError(
                f"DepthwiseConv2d.from_conv: the fast op computes a depthwise conv (groups == in == out channels) "
                f"with stride 1, dilation 1, zero padding k // 2 and an odd kernel; this one has {conv.in_channels} "
                f"in / {conv.out_channels} out channels, groups={conv.groups}, kernel_size={tuple(conv.kernel_size)}, "
                f"stride={tuple(conv.stride)}, dilation={tuple(conv.dilation)}, padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}: keep it an nn.Conv2d (lkfast.nn.patch_model leaves such "
                f"convs as they are)")
        for name in ("weight", "bias") if conv.bias is not None else ("weight",):
            if not isinstance(conv._parameters.get(name), nn.Parameter):
                raise ValueError(f"DepthwiseConv2d.from_conv: the conv's {name} is not a parameter of its own "
                                 f"(found {type(getattr(conv, name)).__name__}; computed by a hook such as "
                                 f"weight_norm, spectral_norm or pruning); use lkfast.nn.patch_model(model), "
                                 f"which patches the conv in place and keeps its hooks")
        fast = cls(conv.in_channels, conv.kernel_size, bias=conv.bias is not None, device="meta")
        fast.weight = conv.weight
        if conv.bias is not None:
            fast.bias = conv.bias
        fast.train(conv.training)
        return fast


def make_conv2d(in_channels: int, out_channels: int, kernel_size: KernelSize, stride=1, padding=None,
                dilation=1, groups: int = 1, bias: bool = False, fast: bool = True) -> nn.Conv2d:
    """``DepthwiseConv2d`` when ``fast`` and ``fast_op_computes`` holds for these arguments,
    ``PointwiseConv2d`` (an ``nn.Conv2d`` that runs small maps as a matrix product on the CPU) for
    a fast 1x1, stride-1 conv, else ``nn.Conv2d`` (``padding=None`` means k // 2 on each side)."""
    kh, kw = _pair(kernel_size)
    if padding is None:
        padding = (kh // 2, kw // 2)
    if fast and fast_op_computes(in_channels, out_channels, (kh, kw), stride, padding, dilation, groups):
        return DepthwiseConv2d(in_channels, (kh, kw), bias=bias)
    from lkfast.nn.pointwise import PointwiseConv2d, is_pointwise

    if fast and is_pointwise((kh, kw), stride, padding, groups):
        return PointwiseConv2d(in_channels, out_channels, bias=bias)
    return nn.Conv2d(in_channels, out_channels, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias)

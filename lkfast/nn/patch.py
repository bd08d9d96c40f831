"""Swap a model's depthwise ``nn.Conv2d`` layers for ``DepthwiseConv2d`` (the fast op), in place."""
from __future__ import annotations

import torch.nn as nn

from lkfast.nn.depthwise import DEFAULT_MIN_KERNEL_SIZE, DepthwiseConv2d, fast_op_computes


def is_eligible(module: nn.Module, min_kernel_size: int = DEFAULT_MIN_KERNEL_SIZE) -> bool:
    """True for a plain ``nn.Conv2d`` with floating-point weights for which ``fast_op_computes``
    holds (depthwise, stride 1, dilation 1, zero padding of k // 2 on each side, odd kernel with
    its larger side at least ``min_kernel_size``): the same rule ``make_conv2d`` applies.

    Subclasses of ``nn.Conv2d`` (e.g. timm's ``Conv2dSame`` with its dynamic padding) are not
    touched: their forward may differ from the plain convolution.
    """
    if type(module) is not nn.Conv2d or not module.weight.is_floating_point():
        return False
    return fast_op_computes(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.padding_mode, min_kernel_size)


def patch_model(model: nn.Module, min_kernel_size: int = DEFAULT_MIN_KERNEL_SIZE) -> int:
    """Replace, in place, every eligible depthwise ``nn.Conv2d`` of ``model`` (see ``is_eligible``)
    with a ``DepthwiseConv2d`` holding the same parameter tensors (same device, dtype, requires_grad;
    optimizers keep tracking them). Outputs are unchanged within floating-point tolerance.

    Returns the number of layers swapped (0 when none is eligible, e.g. a model already patched).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_eligible(child, min_kernel_size):
                setattr(parent, name, DepthwiseConv2d.from_conv(child))
                swapped += 1
    return swapped

"""Swap a model's depthwise ``nn.Conv2d`` layers for ``DepthwiseConv2d`` (the fast op), in place."""
from __future__ import annotations

import torch.nn as nn

from lkfast.nn.depthwise import DEFAULT_MIN_KERNEL_SIZE, DepthwiseConv2d, fast_op_computes


def is_eligible(module: nn.Module, min_kernel_size: int = DEFAULT_MIN_KERNEL_SIZE) -> bool:
    """True for a plain ``nn.Conv2d`` with floating-point weights for which ``fast_op_computes``
    holds (depthwise, stride 1, dilation 1, zero padding of k // 2 on each side, odd kernel with
    its larger side at least ``min_kernel_size``): the same rule ``make_conv2d`` applies.

    Subclasses of ``nn.Conv2d`` are not touched: their forward may differ from the plain
    convolution (e.g. timm's ``Conv2dSame`` with its dynamic padding, or a conv under
    ``torch.nn.utils.parametrize``, whose class is a generated subclass).
    """
    if type(module) is not nn.Conv2d or not module.weight.is_floating_point():
        return False
    return fast_op_computes(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.padding_mode, min_kernel_size)


def patch_model(model: nn.Module, min_kernel_size: int = DEFAULT_MIN_KERNEL_SIZE) -> int:
    """Make every eligible depthwise ``nn.Conv2d`` of ``model`` (see ``is_eligible``) a
    ``DepthwiseConv2d``, in place: the module object itself changes class (as
    ``torch.nn.utils.parametrize`` does), so it keeps its parameter tensors (same device, dtype,
    requires_grad; optimizers keep tracking them), its hooks (forward, backward, state_dict, and
    those of ``weight_norm``, ``spectral_norm`` and ``torch.nn.utils.prune``, which compute
    ``weight`` before each call), any other attribute, and its identity (a conv shared by two
    parents, or held elsewhere, is patched everywhere). Outputs are unchanged within floating-point
    tolerance.

    Returns the number of layers patched (0 when none is eligible, e.g. a model already patched).
    """
    eligible = [module for module in model.modules() if is_eligible(module, min_kernel_size)]
    for conv in eligible:
        # nn.Conv2d and DepthwiseConv2d hold the same state (DepthwiseConv2d only narrows which
        # arguments its constructor accepts, all of which is_eligible checked): only forward differs.
        conv.__class__ = DepthwiseConv2d
    return len(eligible)

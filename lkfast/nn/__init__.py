"""Modules over the op layer.

    DepthwiseConv2d(channels, kernel_size, bias=True)   drop-in for a same-padded depthwise nn.Conv2d
    ReparamLargeKernelConv(...)                         RepLKNet's large + small kernel conv with BN
    patch_model(model)                                  swap eligible depthwise convs for the fast op
"""
from lkfast.nn.conv import (DepthwiseConv2d, ReparamLargeKernelConv, conv_bn, conv_bn_relu, fuse_conv_bn,
                            make_conv2d)
from lkfast.nn.patch import DEFAULT_MIN_KERNEL_SIZE, is_eligible, patch_model

__all__ = ["DepthwiseConv2d", "ReparamLargeKernelConv", "patch_model", "is_eligible", "DEFAULT_MIN_KERNEL_SIZE",
           "conv_bn", "conv_bn_relu", "fuse_conv_bn", "make_conv2d"]

"""Modules over the op layer.

    DepthwiseConv2d(channels, kernel_size, bias=True)   drop-in for a same-padded depthwise nn.Conv2d
    patch_model(model)                                  swap eligible depthwise convs for the fast op,
                                                        linears for PointwiseLinear
    unpatch_model(model)                                and back to nn.Conv2d / nn.Linear (TorchScript, exporters)
    is_eligible(module), fast_op_computes(...)          the one rule saying which convs those are
    is_linear_eligible(module)                          which linears patch_model swaps
    ReparamLargeKernelConv(...)                         RepLKNet's large + small kernel conv with BN
    conv_bn, conv_bn_relu, fuse_conv_bn                 RepLKNet's conv + BN blocks and BN folding
    PointwiseConv2d(in, out, bias=True)                 1x1 conv; small channels_last CPU maps as F.linear
    PointwiseLinear(in, out, bias=True)                 nn.Linear; CPU activations (NHWC, tokens) as a 1x1 conv
                                                        (each where this machine measured it faster)

The generic drop-in lives in ``lkfast/nn/depthwise.py``, the RepLKNet pieces in
``lkfast/nn/reparam.py``, the model patcher in ``lkfast/nn/patch.py``.
"""
from lkfast.nn.depthwise import DEFAULT_MIN_KERNEL_SIZE, DepthwiseConv2d, fast_op_computes, make_conv2d
from lkfast.nn.patch import is_eligible, is_linear_eligible, patch_model, unpatch_model
from lkfast.nn.pointwise import PointwiseConv2d, PointwiseLinear, pointwise_conv2d, pointwise_linear
from lkfast.nn.reparam import ConvBN, ReparamLargeKernelConv, conv_bn, conv_bn_relu, fuse_conv_bn

__all__ = ["DepthwiseConv2d", "ReparamLargeKernelConv", "patch_model", "unpatch_model", "is_eligible", "DEFAULT_MIN_KERNEL_SIZE",
           "conv_bn", "conv_bn_relu", "fuse_conv_bn", "make_conv2d", "fast_op_computes", "ConvBN", "PointwiseConv2d", "pointwise_conv2d",
           "PointwiseLinear", "pointwise_linear", "is_linear_eligible"]

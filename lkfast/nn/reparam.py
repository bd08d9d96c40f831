"""RepLKNet's building blocks over the fast op (Ding et al. 2022, official key names).

    ConvBN, conv_bn, conv_bn_relu   conv + BN [+ nonlinear] with the official RepLKNet key names;
                                    the BN folded into the conv in inference mode (fast models)
    fuse_conv_bn                    the (kernel, bias) of a conv followed by an inference-mode BN
    ReparamLargeKernelConv          RepLKNet's large kernel + parallel small kernel, each followed by BN
"""
from __future__ import annotations

import numbers
import weakref
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfast.nn.depthwise import DepthwiseConv2d, KernelSize, make_conv2d
from lkfast.nn.pointwise import PointwiseConv2d, is_pointwise, pointwise_conv2d
from lkfast.ops import depthwise_conv2d


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(x) == x * scale + shift`` per channel, for ``bn`` in inference mode."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std if bn.weight is not None else 1.0 / std
    shift = bn.bias if bn.bias is not None else torch.zeros_like(std)
    return scale, shift - bn.running_mean * scale


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel and bias of one conv equal to ``bn(conv(x))`` with ``bn`` in inference mode.

    Built from differentiable tensor ops, so gradients reach the conv and BN parameters.
    """
    scale, shift = bn_scale_shift(bn)
    kernel = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else shift + conv.bias * scale
    return kernel, bias


def fold_bn_before(kernel: torch.Tensor, bias: torch.Tensor, pre_bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel and bias of one 1x1 conv equal to ``conv(pre_bn(x))`` (``conv``: ``kernel``,
    ``bias``; ``pre_bn`` in inference mode). Exact only for a plain 1x1 conv (``is_pointwise``): a
    padded kernel would see the BN's shift leak into its border."""
    scale, shift = bn_scale_shift(pre_bn)
    return kernel * scale.reshape(1, -1, 1, 1), bias + kernel.flatten(1) @ shift


def _bn_in_inference_mode(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None


class _FoldCache:
    """Remembers a folded (kernel, bias) while the tensors it was made from are unchanged.

    Only used when none of them requires grad (frozen weights: inference, attacks), so the cached
    result never needs to be part of an autograd graph. A tensor counts as unchanged while it is
    the same tensor object (held by weak reference: another tensor at its address, a view reading
    the same memory another way or one allocated where a freed one lay, as a loop over
    ``functional_call`` with fresh weight copies gives, is a new one) with the same storage pointer
    and version counter (bumped by every in-place write). Writes
    through ``.data`` (``weight.data.mul_(2)``) bypass the version counter and are not seen: the
    owning module forgets its fold on every ``train()``/``eval()`` call, so call ``model.eval()``
    after such a write. Inference tensors (made under ``torch.inference_mode``) have no version
    counter: the fold is computed afresh on every call, as under ``torch.func`` transforms (vmapped
    weights, as ``functional_call`` over stacked parameters gives, have no storage to point at,
    and a fold made from them belongs to that call alone). Under ``torch.compile`` the fold is traced
    instead (storage pointers and version counters cannot be guarded on: every layer would
    recompile and the model fall back to eager after the limit).
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.key, self.value, self.refs = None, None, ()

    def __reduce__(self):  # pickled and copied empty (weak references cannot be pickled)
        return _FoldCache, ()

    def get(self, sources: list, compute):
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
                or any(t.requires_grad or t.is_inference() for t in sources):
            return compute()
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
        if key != self.key or any(ref() is not t for ref, t in zip(self.refs, sources)):
            # Kept as normal tensors even when filled under torch.inference_mode: an inference tensor
            # cannot be saved for backward by a later call outside it (a frozen model's input gradient).
            with torch.inference_mode(False), torch.no_grad():
                self.value = compute()
            self.key, self.refs = key, tuple(weakref.ref(t) for t in sources)
        return self.value


def _bn_tensors(bn: nn.BatchNorm2d) -> list:
    return [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]


def _conv_like(conv: nn.Conv2d, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with another kernel and bias (the fast op for DepthwiseConv2d)."""
    if isinstance(conv, DepthwiseConv2d):
        return depthwise_conv2d(x, kernel, bias)
    if isinstance(conv, PointwiseConv2d):
        return pointwise_conv2d(x, kernel.to(x.dtype), bias.to(x.dtype))
    return F.conv2d(x, kernel.to(x.dtype), bias.to(x.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvBN(nn.Sequential):
    """Conv (no bias), BatchNorm and an optional nonlinearity, as ``nn.Sequential`` children ``conv``,
    ``bn`` and ``nonlinear`` (the official RepLKNet layout, so the state_dict keys are the same).

    With ``fold_in_eval`` (lkfast's fast models) and the BN in inference mode, the pair runs as one
    conv with the BN folded into kernel and bias, computed on the fly from the parameters: same
    function, no separate BN pass forward or backward, gradients still reach every parameter.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, nonlinear: Optional[nn.Module] = None,
                 fold_in_eval: bool = True):
        layers = OrderedDict(conv=conv, bn=bn)
        if nonlinear is not None:
            layers["nonlinear"] = nonlinear
        super().__init__(layers)
        self.fold_in_eval = fold_in_eval
        self._fold_cache = _FoldCache()

    def train(self, mode: bool = True) -> "ConvBN":
        self._fold_cache.clear()  # re-fold after writes the cache cannot see (see _FoldCache)
        return super().train(mode)

    def _can_fold(self) -> bool:
        return self.fold_in_eval and _bn_in_inference_mode(self.bn) and isinstance(self.conv, nn.Conv2d) \
            and self.conv.padding_mode == "zeros"

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(x) if hasattr(self, "nonlinear") else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._can_fold():
            sources = [self.conv.weight] + _bn_tensors(self.bn)
            folded = self._fold_cache.get(sources, lambda: fuse_conv_bn(self.conv, self.bn))
            return self._finish(_conv_like(self.conv, x, *folded))
        return super().forward(x)

    def forward_after_bn(self, x: torch.Tensor, pre_bn: nn.BatchNorm2d) -> torch.Tensor:
        """``self(pre_bn(x))``; with a 1x1 conv and both BNs in inference mode, ``pre_bn`` is folded
        into the conv as well (exact: a 1x1 conv has no padding for the shift to leak into)."""
        conv = self.conv
        if not (self._can_fold() and _bn_in_inference_mode(pre_bn)
                and is_pointwise(conv.kernel_size, conv.stride, conv.padding, conv.groups)):
            return self(pre_bn(x))

        def fold():
            return fold_bn_before(*fuse_conv_bn(conv, self.bn), pre_bn)

        sources = [conv.weight] + _bn_tensors(self.bn) + _bn_tensors(pre_bn)
        return self._finish(_conv_like(conv, x, *self._fold_cache.get(sources, fold)))


def conv_bn(in_channels: int, out_channels: int, kernel_size: KernelSize, stride=1, padding=None, groups: int = 1,
            dilation=1, fast: bool = True) -> ConvBN:
    """Conv (no bias) then BatchNorm, children ``conv`` and ``bn``; ``fast`` picks the fast op for
    large depthwise kernels and folds the BN into the conv in inference mode."""
    conv = make_conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False, fast=fast)
    return ConvBN(conv, nn.BatchNorm2d(out_channels), fold_in_eval=fast)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: KernelSize, stride=1, padding=None,
                 groups: int = 1, dilation=1, fast: bool = True) -> ConvBN:
    """``conv_bn`` followed by a ReLU child named ``nonlinear``."""
    block = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation, fast=fast)
    block.add_module("nonlinear", nn.ReLU())
    return block


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet's re-parameterisable large-kernel conv (Ding et al. 2022), official key names.

    Training form: ``lkb_origin`` (large conv + BN) plus, when ``small_kernel`` is set, a parallel
    ``small_conv`` (small conv + BN); the two outputs are summed. ``merge_kernel()`` folds both into
    one conv with bias, ``lkb_reparam`` (what ``small_kernel_merged=True`` builds directly).

    With ``fast=True`` the depthwise large (and small) kernels run through the fast op, and in
    inference mode (both BNs in eval) the unmerged form is computed as one convolution with the
    equivalent kernel, derived on the fly so gradients still reach every parameter.
    Loading a state_dict of the other form (merged into unmerged or back) switches the module to
    that form first, so both the official training-time and re-parameterised checkpoints load.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: Optional[int], small_kernel_merged: bool = False, fast: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.groups, self.stride = in_channels, out_channels, groups, stride
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.fast = fast
        self._fold_cache = _FoldCache()
        for name, size in (("kernel_size", kernel_size), ("small_kernel", small_kernel)):
            # k // 2 padding keeps the size for odd k only: an even one failed at the first forward
            # (the branches' outputs, or the block's residual, one pixel apart)
            if size is not None and (not isinstance(size, numbers.Integral) or size < 1 or size % 2 == 0):
                raise ValueError(f"ReparamLargeKernelConv: {name} must be an odd kernel size (1, 3, 5, ...), got "
                                 f"{size!r}")
        if small_kernel is not None and small_kernel > kernel_size:
            raise ValueError(f"ReparamLargeKernelConv: small_kernel ({small_kernel}) must not exceed kernel_size ({kernel_size})")
        if small_kernel_merged:
            self._build_merged()
        else:
            self._build_unmerged()

    def _build_unmerged(self) -> None:
        self.lkb_origin = conv_bn(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                  self.kernel_size // 2, self.groups, fast=self.fast)
        if self.small_kernel is not None:
            self.small_conv = conv_bn(self.in_channels, self.out_channels, self.small_kernel, self.stride,
                                      self.small_kernel // 2, self.groups, fast=self.fast)

    def _build_merged(self) -> None:
        self.lkb_reparam = make_conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.kernel_size // 2, 1, self.groups, bias=True, fast=self.fast)

    def train(self, mode: bool = True) -> "ReparamLargeKernelConv":
        self._fold_cache.clear()  # re-fold after writes the cache cannot see (see _FoldCache)
        return super().train(mode)

    @property
    def merged(self) -> bool:
        return hasattr(self, "lkb_reparam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.lkb_reparam(x)
        if isinstance(self.lkb_origin.conv, DepthwiseConv2d) and self._branches_in_inference_mode():
            sources = [p for branch in self.children() for p in [branch.conv.weight] + _bn_tensors(branch.bn)]
            return depthwise_conv2d(x, *self._fold_cache.get(sources, self.get_equivalent_kernel_bias))
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    def _branches_in_inference_mode(self) -> bool:
        return _bn_in_inference_mode(self.lkb_origin.bn) and (
            not hasattr(self, "small_conv") or _bn_in_inference_mode(self.small_conv.bn))

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel ``(out, in/groups, k, k)`` and bias of the single conv equal to this module in eval mode."""
        kernel, bias = fuse_conv_bn(self.lkb_origin.conv, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            small_kernel, small_bias = fuse_conv_bn(self.small_conv.conv, self.small_conv.bn)
            pad = (self.kernel_size - self.small_kernel) // 2
            kernel = kernel + F.pad(small_kernel, [pad] * 4)  # centre the small kernel in the large one
            bias = bias + small_bias
        return kernel, bias

    @torch.no_grad()
    def merge_kernel(self) -> None:
        """Replace the branches with ``lkb_reparam``, one conv with the equivalent kernel and bias."""
        if self.merged:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        reference = self.lkb_origin.conv.weight
        self._build_merged()
        self.lkb_reparam.to(device=reference.device, dtype=reference.dtype)
        self.lkb_reparam.train(self.training)  # the new conv follows this module's train/eval mode
        self.lkb_reparam.weight.copy_(kernel)
        self.lkb_reparam.bias.copy_(bias)
        del self.lkb_origin
        if hasattr(self, "small_conv"):
            del self.small_conv

    def _switch_form(self, merged: bool) -> None:
        reference = next(self.parameters())
        for name in ("lkb_reparam", "lkb_origin", "small_conv"):
            if hasattr(self, name):
                delattr(self, name)
        if merged:
            self._build_merged()
        else:
            self._build_unmerged()
        self.to(device=reference.device, dtype=reference.dtype)
        self.train(self.training)  # new children follow this module's train/eval mode

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Children are loaded after this hook runs, so switching form here lets them find their keys.
        has_merged = any(k.startswith(prefix + "lkb_reparam.") for k in state_dict)
        has_unmerged = any(k.startswith(prefix + "lkb_origin.") for k in state_dict)
        if has_merged and not has_unmerged and not self.merged:
            self._switch_form(merged=True)
        elif has_unmerged and not has_merged and self.merged:
            self._switch_form(merged=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, merged={self.merged}"

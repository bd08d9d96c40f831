"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022), checkpoint-compatible with
the official release (DingXiaoH/RepLKNet-pytorch): module and parameter names follow it, so the
published ``.pth`` files, training-time or re-parameterised, load with ``strict=True``.

Layout: stem (4 conv-BN-ReLU, stride 4 in total) -> 4 stages, each of alternating RepLK blocks
(BN, 1x1 conv, large depthwise conv with a parallel small kernel, ReLU, 1x1 conv, residual) and
ConvFFN blocks (BN, 1x1 conv, GELU, 1x1 conv, residual), with a transition (1x1 conv, stride-2
depthwise 3x3) between stages -> BN, global average pool, linear head.

Large kernels run through ``lkfast.nn.DepthwiseConv2d`` (the fast op) unless ``fast=False``,
which builds the plain ``nn.Conv2d`` model the official code runs (used as the benchmark baseline).
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from lkfast.nn import DepthwiseConv2d, ReparamLargeKernelConv, conv_bn, conv_bn_relu
from lkfast.nn.pointwise import PointwiseConv2d
from lkfast.nn.reparam import bn_scale_shift, fold_bn_before
from lkfast.nn import fuse_conv_bn as _fuse_conv_bn  # structural_reparam has an argument of that name

__all__ = ["RepLKNet", "RepLKBlock", "ConvFFN", "RepLKNetStage", "OFFICIAL_CHECKPOINTS", "fold_batchnorms",
           "optimize_for_inference"]


def _drop_path_or_identity(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class ConvFFN(nn.Module):
    """x + drop_path(pw2(GELU(pw1(BN(x))))), with 1x1 conv-BN pairs ``pw1`` and ``pw2``."""

    def __init__(self, in_channels: int, internal_channels: int, out_channels: int, drop_path: float = 0.0,
                 fast: bool = True):
        super().__init__()
        self.drop_path = _drop_path_or_identity(drop_path)
        self.preffn_bn = nn.BatchNorm2d(in_channels)
        self.pw1 = conv_bn(in_channels, internal_channels, 1, 1, 0, fast=fast)
        self.pw2 = conv_bn(internal_channels, out_channels, 1, 1, 0, fast=fast)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.nonlinear(self.pw1.forward_after_bn(x, self.preffn_bn)))
        return x + self.drop_path(out)


class RepLKBlock(nn.Module):
    """x + drop_path(pw2(ReLU(large_kernel(pw1(BN(x)))))), where ``pw1`` (with ReLU) widens to
    ``dw_channels`` and ``large_kernel`` is the depthwise ``ReparamLargeKernelConv``."""

    def __init__(self, in_channels: int, dw_channels: int, block_lk_size: int, small_kernel: Optional[int],
                 drop_path: float = 0.0, small_kernel_merged: bool = False, fast: bool = True):
        super().__init__()
        self.pw1 = conv_bn_relu(in_channels, dw_channels, 1, 1, 0, fast=fast)
        self.pw2 = conv_bn(dw_channels, in_channels, 1, 1, 0, fast=fast)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, stride=1, groups=dw_channels,
                                                   small_kernel=small_kernel, small_kernel_merged=small_kernel_merged,
                                                   fast=fast)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_channels)
        self.drop_path = _drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1.forward_after_bn(x, self.prelkb_bn))))
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """``num_blocks`` pairs of (RepLKBlock, ConvFFN) in ``blocks``; ``norm`` is a BN only when
    ``norm_intermediate_features`` (RepLKNet-XL's detection/segmentation backbones)."""

    def __init__(self, channels: int, num_blocks: int, stage_lk_size: int, drop_path: Sequence[float],
                 small_kernel: Optional[int], dw_ratio: float = 1, ffn_ratio: float = 4, use_checkpoint: bool = False,
                 small_kernel_merged: bool = False, norm_intermediate_features: bool = False, fast: bool = True):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        blocks = []
        for i in range(num_blocks):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel, drop_path[i],
                                     small_kernel_merged=small_kernel_merged, fast=fast))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, drop_path[i], fast=fast))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.BatchNorm2d(channels) if norm_intermediate_features else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # trades compute for memory
            else:
                x = block(x)
        return x


class RepLKNet(nn.Module):
    """RepLKNet classifier (or multi-scale backbone with ``out_indices``).

    Args:
        large_kernel_sizes: kernel size of the RepLK blocks in each stage, e.g. [31, 29, 27, 13].
        layers: number of (RepLK block, ConvFFN) pairs per stage, e.g. [2, 2, 18, 2].
        channels: width of each stage, e.g. [128, 256, 512, 1024].
        small_kernel: size of the parallel small kernel (re-parameterised into the large one), or None
            (or 0) for none; ``timm.create_model`` drops keyword arguments that are None, so there
            pass ``small_kernel=0`` (``lkfast.models.create_model`` takes None as well).
        dw_ratio: width of the depthwise conv relative to the stage width (1.5 for XL).
        ffn_ratio: ConvFFN expansion.
        num_classes: classifier outputs; 0 gives no head (``forward`` returns pooled features).
        drop_path_rate: stochastic depth, rising linearly over blocks to this value.
        small_kernel_merged: build the re-parameterised form (``lkb_reparam``) directly.
        out_indices: stage indices whose feature maps ``forward`` returns (downstream use; no head).
        norm_intermediate_features: BN on those feature maps (RepLKNet-XL downstream).
        use_checkpoint: activation checkpointing of each block during training (saves memory).
        fast: large kernels through ``lkfast.nn.DepthwiseConv2d`` and, in eval mode, every BN folded
            on the fly into the conv next to it (same function, fewer passes); False builds the
            plain model the official code runs (``nn.Conv2d``, separate BNs).
    """

    def __init__(self, large_kernel_sizes: Sequence[int], layers: Sequence[int], channels: Sequence[int],
                 small_kernel: Optional[int], dw_ratio: float = 1, ffn_ratio: float = 4, in_channels: int = 3,
                 num_classes: int = 1000, drop_path_rate: float = 0.0, small_kernel_merged: bool = False,
                 out_indices: Optional[Sequence[int]] = None, norm_intermediate_features: bool = False,
                 use_checkpoint: bool = False, fast: bool = True, in_chans: Optional[int] = None, **kwargs):
        super().__init__()
        kwargs.pop("global_pool", None)  # timm passes it; RepLKNet always average-pools
        if kwargs:
            raise TypeError(f"RepLKNet: unexpected arguments {sorted(kwargs)}")
        if not (len(large_kernel_sizes) == len(layers) == len(channels)):
            raise ValueError("RepLKNet: large_kernel_sizes, layers and channels need one entry per stage, got "
                             f"{len(large_kernel_sizes)}, {len(layers)} and {len(channels)}")
        if out_indices is not None and num_classes:
            raise ValueError("RepLKNet: out_indices (backbone use) and a classifier head exclude each other; "
                             "pass num_classes=0 with out_indices")
        in_channels = in_chans if in_chans is not None else in_channels  # timm's spelling
        if small_kernel is not None and small_kernel < 0:
            raise ValueError(f"RepLKNet: small_kernel must be a kernel size, or None or 0 for none, got {small_kernel}")
        small_kernel = small_kernel or None  # 0: what create_model passes for None, which timm would drop
        even = [f"large_kernel_sizes[{i}] = {k!r}" for i, k in enumerate(large_kernel_sizes)
                if not isinstance(k, numbers.Integral) or k < 1 or k % 2 == 0]
        if small_kernel is not None and (not isinstance(small_kernel, numbers.Integral) or small_kernel % 2 == 0):
            even.append(f"small_kernel = {small_kernel!r}")
        if even:  # k // 2 padding keeps the size for odd k only: an even one failed at the first forward
            raise ValueError(f"RepLKNet: kernel sizes must be odd (1, 3, 5, ...), got {', '.join(even)}")
        self.large_kernel_sizes, self.layers, self.channels = list(large_kernel_sizes), list(layers), list(channels)
        self.small_kernel, self.fast = small_kernel, fast
        self.out_indices = list(out_indices) if out_indices is not None else None
        self.num_stages = len(layers)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = channels[-1]
        self.drop_path_rate = drop_path_rate

        width = channels[0]
        self.stem = nn.ModuleList([
            conv_bn_relu(in_channels, width, 3, stride=2, padding=1, fast=fast),
            conv_bn_relu(width, width, 3, stride=1, padding=1, groups=width, fast=fast),
            conv_bn_relu(width, width, 1, stride=1, padding=0, fast=fast),
            conv_bn_relu(width, width, 3, stride=2, padding=1, groups=width, fast=fast),
        ])
        rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()  # also under a meta device context
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i in range(self.num_stages):
            first = sum(layers[:i])
            self.stages.append(RepLKNetStage(
                channels[i], layers[i], large_kernel_sizes[i], rates[first:first + layers[i]], small_kernel,
                dw_ratio=dw_ratio, ffn_ratio=ffn_ratio, use_checkpoint=use_checkpoint,
                small_kernel_merged=small_kernel_merged, norm_intermediate_features=norm_intermediate_features,
                fast=fast))
            if i < self.num_stages - 1:
                self.transitions.append(nn.Sequential(
                    conv_bn_relu(channels[i], channels[i + 1], 1, 1, 0, fast=fast),
                    conv_bn_relu(channels[i + 1], channels[i + 1], 3, stride=2, padding=1, groups=channels[i + 1],
                                 fast=fast)))
        # What timm's features_only wrapper (FeatureGetterNet, through forward_intermediates) returns.
        self.feature_info = [dict(num_chs=channels[i], reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i in range(self.num_stages)]
        if self.out_indices is None:
            self.norm = nn.BatchNorm2d(channels[-1])
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(channels[-1], num_classes) if num_classes else nn.Identity()

    # --- forward -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor):
        """Last stage's feature map, or the list of ``out_indices`` feature maps."""
        for layer in self.stem:
            x = layer(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.out_indices is not None and i in self.out_indices:
                outs.append(stage.norm(x))
            if i < self.num_stages - 1:
                x = self.transitions[i](x)
        return outs if self.out_indices is not None else x

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature interface: the output of each stage in ``indices`` (the last n if an int,
        all if None; before the transition to the next stage, through ``stage.norm``), NCHW, and,
        unless ``intermediates_only``, the last stage's output first (what ``forward_head`` takes).
        ``norm`` passes the last stage's feature map through the final BN; ``stop_early`` skips the
        stages after the last one asked for. ``timm.create_model(..., features_only=True)`` calls this.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"RepLKNet.forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = self.num_stages - 1
        for layer in self.stem:
            x = layer(x)
        intermediates = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in take_indices:
                final_norm = norm and i == last and isinstance(getattr(self, "norm", None), nn.BatchNorm2d)
                intermediates.append(self.norm(x) if final_norm else stage.norm(x))
            if stop_early and i >= max_index:
                break
            if i < last:
                x = self.transitions[i](x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (and with them the final BN and the head),
        the head when ``prune_head``, the final BN when ``prune_norm``; returns the absolute indices."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        prune_end = max_index < self.num_stages - 1
        self.stages = self.stages[:max_index + 1]
        self.transitions = self.transitions[:max_index]
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:max_index + 1]
        if self.out_indices is None:
            if prune_norm or prune_end:
                self.norm = nn.Identity()
            if prune_head or prune_end:
                self.head, self.num_classes = nn.Identity(), 0
            if prune_end:
                self.num_features = self.head_hidden_size = self.channels[max_index]
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.norm(x)), 1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        return x if self.out_indices is not None else self.forward_head(x)

    # --- timm classifier interface ---------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new Linear head of ``num_classes`` outputs on the pooled features (none for 0), in the
        model's device and dtype; also after ``prune_intermediate_layers`` took the final BN away."""
        if self.out_indices is not None:
            raise ValueError(f"this RepLKNet is a backbone (out_indices={list(self.out_indices)}): it returns feature "
                             "maps and has no classifier to reset; build it with out_indices=None for a head")
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes else nn.Identity())

    # --- re-parameterisation -----------------------------------------------------------------------
    @torch.no_grad()
    def structural_reparam(self, fuse_conv_bn: bool = False) -> "RepLKNet":
        """Fold every small-kernel branch and its BN into the large kernel (``lkb_reparam``: one
        depthwise conv with bias), giving the official re-parameterised layout. Outputs are unchanged
        in eval mode (up to float rounding). With ``fuse_conv_bn`` also fold every other conv-BN pair
        into a conv with bias (the BN becomes Identity): inference only, and the state_dict no longer
        matches the official layout. Returns the model.
        """
        for module in self.modules():
            if isinstance(module, ReparamLargeKernelConv):
                module.merge_kernel()
        if fuse_conv_bn:
            for module in self.modules():
                if isinstance(module, nn.Sequential) and isinstance(getattr(module, "bn", None), nn.BatchNorm2d) \
                        and isinstance(getattr(module, "conv", None), nn.Conv2d):
                    module.conv = _conv_with_bias(module.conv, *_fuse_conv_bn(module.conv, module.bn))
                    module.bn = nn.Identity().train(module.bn.training)
        return self


def _conv_with_bias(conv: nn.Conv2d, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A conv of the same kind, geometry and train/eval mode as ``conv`` holding ``kernel`` and ``bias``."""
    if isinstance(conv, DepthwiseConv2d):
        fused = DepthwiseConv2d(conv.in_channels, conv.kernel_size, bias=True)
    elif isinstance(conv, PointwiseConv2d):
        fused = PointwiseConv2d(conv.in_channels, conv.out_channels, bias=True)
    else:
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused.to(device=kernel.device, dtype=kernel.dtype).train(conv.training)
    fused.weight.copy_(kernel)
    fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def fold_batchnorms(model: RepLKNet) -> RepLKNet:
    """Fold every BatchNorm of ``model`` (a RepLKNet) into a neighbouring conv or the head, in place,
    for inference: the small kernels into the large ones and each conv-BN pair into a conv with bias
    (``structural_reparam(fuse_conv_bn=True)``), each block's pre-BN (``prelkb_bn``, ``preffn_bn``)
    into the 1x1 conv after it, and the final ``norm`` into the linear head (average pooling is
    linear, so the per-channel affine map passes through it). All exact up to float rounding: the
    outputs and the gradients with respect to the input equal the eval-mode model's.

    Returns the model, in eval mode, with no BatchNorm left (except ``stage.norm`` of a backbone with
    ``norm_intermediate_features``). Refused (TypeError) for other models. The folded model is for
    inference and input gradients (attacks, saliency): its state_dict no longer has the official
    layout and training it would train the folded parameters with no BN.
    """
    if not isinstance(model, RepLKNet):
        raise TypeError(f"fold_batchnorms: expected a RepLKNet, got {type(model).__name__}; for other models "
                        "use torch.compile with torch._inductor.config.freezing = True, which folds conv-BN pairs")
    model.eval()
    model.structural_reparam(fuse_conv_bn=True)
    for block in list(model.modules()):
        if not isinstance(block, (RepLKBlock, ConvFFN)):
            continue
        name = "prelkb_bn" if isinstance(block, RepLKBlock) else "preffn_bn"
        pre_bn = getattr(block, name)
        if isinstance(pre_bn, nn.BatchNorm2d):
            # pw1 is a 1x1 conv, stride 1, no padding: pre_bn's shift has no border to leak into.
            conv = block.pw1.conv
            block.pw1.conv = _conv_with_bias(conv, *fold_bn_before(conv.weight, conv.bias, pre_bn))
            setattr(block, name, nn.Identity().train(pre_bn.training))
    if model.out_indices is None and isinstance(model.norm, nn.BatchNorm2d) and isinstance(model.head, nn.Linear):
        scale, shift = bn_scale_shift(model.norm)
        head = model.head
        folded = nn.Linear(head.in_features, head.out_features, device=head.weight.device,
                           dtype=head.weight.dtype).train(head.training)
        folded.weight.copy_(head.weight * scale.reshape(1, -1))
        folded.bias.copy_(head.bias + head.weight @ shift)
        model.head, model.norm = folded, nn.Identity().train(model.norm.training)
    return model


def optimize_for_inference(model: RepLKNet, compile: bool = False) -> nn.Module:
    """``model`` (a RepLKNet) made as fast as measured for inference and input gradients on the CPU.

    Folds every BatchNorm (``fold_batchnorms``, in place; see there for what the folded model is for)
    and, with ``compile``, returns ``torch.compile`` of the folded model with inductor's freezing
    (under ``torch.no_grad`` the weights become constants: 1x1 convs prepacked for oneDNN with their
    bias, ReLU/GELU and residual add fused in; the fast op stays inside the graph). The first call
    compiles (about half a minute for RepLKNet-31B on 2 cores, again for each new input shape or
    grad mode); later in-place changes of the weights are not seen by a frozen graph. Outputs and
    input gradients equal the eval-mode model's within fp32 rounding. Measured on a 2-core Xeon
    (benchmarks/results/models_cpu.md, models_cpu_options.md): the folded RepLKNet-31B runs
    inference 1.33x and the input-gradient step 1.69x the plain channels_last model (1x1 convs on
    small maps as matrix products included, see lkfast.nn.pointwise); ``compile`` was 1.31x plain
    eager and 1.03x plain compiled in one interleaved run, 0.97x and 0.81x in the benchmark's
    back-to-back cases: not a reliable win, so it is off by default. For more speed where the CPU
    has native bf16 (AMX, AVX512-BF16), run the model under ``torch.autocast("cpu", torch.bfloat16)``.
    """
    fold_batchnorms(model)
    return torch.compile(model, options={"freezing": True}) if compile else model


# --- configurations ------------------------------------------------------------------------------

# File names of the official release (Google Drive / Baidu links in DingXiaoH/RepLKNet-pytorch's
# README); they are not on the Hugging Face hub, so users download them and pass the path.
OFFICIAL_CHECKPOINTS = {
    "replknet_31b.in1k": "RepLKNet-31B_ImageNet-1K_224.pth",
    "replknet_31b.in1k_384": "RepLKNet-31B_ImageNet-1K_384.pth",
    "replknet_31b.in22k_ft_in1k": "RepLKNet-31B_ImageNet-22K-to-1K_224.pth",
    "replknet_31b.in22k_ft_in1k_384": "RepLKNet-31B_ImageNet-22K-to-1K_384.pth",
    "replknet_31b.in22k": "RepLKNet-31B_ImageNet-22K.pth",
    "replknet_31l.in22k_ft_in1k_384": "RepLKNet-31L_ImageNet-22K-to-1K_384.pth",
    "replknet_31l.in22k": "RepLKNet-31L_ImageNet-22K.pth",
    "replknet_xl.megdata73m_ft_in1k": "RepLKNet-XL_MegData73M_ImageNet1K.pth",
}


def _cfg(input_size: int = 224, **kwargs) -> dict:
    # The official evaluation (datasets.py): bicubic; below 384 px resize to size / 0.875 and centre
    # crop; at 384 px and above warp the whole image to the input size without cropping.
    large = input_size >= 384
    cfg = {
        "url": "", "num_classes": 1000, "input_size": (3, input_size, input_size), "pool_size": None,
        "crop_pct": 1.0 if large else 0.875, "crop_mode": "squash" if large else "center",
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2203.06717", "origin_url": "https://github.com/DingXiaoH/RepLKNet-pytorch",
    }
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({
    "replknet_31b.in22k_ft_in1k": _cfg(224, notes=(OFFICIAL_CHECKPOINTS["replknet_31b.in22k_ft_in1k"],)),
    "replknet_31b.in22k_ft_in1k_384": _cfg(384, notes=(OFFICIAL_CHECKPOINTS["replknet_31b.in22k_ft_in1k_384"],)),
    "replknet_31b.in1k": _cfg(224, notes=(OFFICIAL_CHECKPOINTS["replknet_31b.in1k"],)),
    "replknet_31b.in1k_384": _cfg(384, notes=(OFFICIAL_CHECKPOINTS["replknet_31b.in1k_384"],)),
    "replknet_31b.in22k": _cfg(224, num_classes=21841, notes=(OFFICIAL_CHECKPOINTS["replknet_31b.in22k"],)),
    "replknet_31l.in22k_ft_in1k_384": _cfg(384, notes=(OFFICIAL_CHECKPOINTS["replknet_31l.in22k_ft_in1k_384"],)),
    "replknet_31l.in22k": _cfg(224, num_classes=21841, notes=(OFFICIAL_CHECKPOINTS["replknet_31l.in22k"],)),
    "replknet_xl.megdata73m_ft_in1k": _cfg(320, mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD,
                                           notes=(OFFICIAL_CHECKPOINTS["replknet_xl.megdata73m_ft_in1k"],)),
    # The paper's kernel-size ablation model; no official weights (train it, or bring your own).
    "replknet_3b": _cfg(224),
})


def build_replknet(variant: str, pretrained: bool = False, **kwargs) -> RepLKNet:
    """``RepLKNet(**kwargs)`` through timm's builder (pretrained_cfg of ``variant``). With
    ``features_only=True`` it is wrapped in timm's FeatureGetterNet, which calls ``forward_intermediates``
    (timm's sequential wrappers cannot run it: stages and transitions alternate from two ModuleLists)."""
    return build_model_with_cfg(RepLKNet, variant, pretrained,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


_31B = dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2], channels=[128, 256, 512, 1024], small_kernel=5)
_31L = dict(_31B, channels=[192, 384, 768, 1536])
_XL = dict(large_kernel_sizes=[27, 27, 27, 13], layers=[2, 2, 18, 2], channels=[256, 512, 1024, 2048],
           small_kernel=None, dw_ratio=1.5)


@register_model
def replknet_31b(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31B: kernels 31/29/27/13 with a parallel 5x5, widths 128..1024 (79M params)."""
    return build_replknet("replknet_31b", pretrained, **dict(_31B, **kwargs))


@register_model
def replknet_31l(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31L: 31B's kernels, widths 192..1536 (172M params)."""
    return build_replknet("replknet_31l", pretrained, **dict(_31L, **kwargs))


@register_model
def replknet_xl(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-XL: kernels 27/27/27/13, no small kernel, depthwise width x1.5, widths 256..2048 (335M)."""
    return build_replknet("replknet_xl", pretrained, **dict(_XL, **kwargs))


@register_model
def replknet_3b(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31B with every large kernel 3x3 (the paper's kernel-size ablation). The official
    small kernel (5) cannot be larger than the large one, so there is no parallel branch."""
    config = dict(_31B, large_kernel_sizes=[3, 3, 3, 3], small_kernel=None)
    return build_replknet("replknet_3b", pretrained, **dict(config, **kwargs))

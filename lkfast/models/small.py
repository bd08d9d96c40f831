"""Small models of the paper's families for 64x64 inputs (the synthetic default benchmark), each
registered with timm so ``lkfast.models.create_model(name, num_classes=10)`` builds it:

    replknet_tiny_k31, replknet_tiny_k13, replknet_tiny_k7, replknet_tiny_k3
        lkfast's RepLKNet with four stages (16, 8, 4, 2 px maps at 64 px input), one or two RepLK
        blocks per stage, widths 16..128, ConvFFN ratio 2; large kernels 31/29/27/13 (RepLKNet-31B's), then 13, 7
        and 3 in every stage (the kernel-size ablation); parallel 5x5 small kernel where the large
        one exceeds 5, none at 3 (as ``replknet_3b``).
    resnet_tiny      timm's ResNet, basic blocks [2, 2, 2, 2] (ResNet-18's layout), widths 16..128
    vit_tiny_p8      timm's VisionTransformer, 8x8 patches (64 tokens), width 64, depth 4, 2 heads

Each carries its preprocessing in ``pretrained_cfg``: input (3, 64, 64), no crop (crop_pct 1.0),
bilinear, mean/std ``SYNTHETIC_MEAN``/``SYNTHETIC_STD``. None has downloadable weights: the
embedded default trains them (``python -m lkfast.train``) and caches the result.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer

from lkfast.models.replknet import RepLKNet, build_replknet

__all__ = ["SMALL_MODELS", "SYNTHETIC_MEAN", "SYNTHETIC_STD"]

SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.25, 0.25, 0.25)
SMALL_MODELS = ("replknet_tiny_k31", "replknet_tiny_k13", "replknet_tiny_k7", "replknet_tiny_k3", "resnet_tiny",
                "vit_tiny_p8")


def _cfg(first_conv: str, classifier: str = "head") -> dict:
    return {"url": "", "num_classes": 10, "input_size": (3, 64, 64), "pool_size": None, "crop_pct": 1.0,
            "crop_mode": "center", "interpolation": "bilinear", "mean": SYNTHETIC_MEAN, "std": SYNTHETIC_STD,
            "first_conv": first_conv, "classifier": classifier, "license": "apache-2.0",
            "notes": ("no published weights: trained on lkfast's synthetic benchmark",)}


default_cfgs = generate_default_cfgs({
    **{f"replknet_tiny_k{k}": _cfg("stem.0.conv") for k in (31, 13, 7, 3)},
    "resnet_tiny": _cfg("conv1", "fc"),
    "vit_tiny_p8": _cfg("patch_embed.proj"),
})

_TINY = dict(layers=[1, 1, 2, 1], channels=[16, 32, 64, 128], ffn_ratio=2, num_classes=10)


def _replknet(variant: str, kernels, pretrained: bool, **kwargs) -> RepLKNet:
    small = 5 if min(kernels) > 5 else None
    args = dict(_TINY, large_kernel_sizes=list(kernels), small_kernel=small)
    args.update(kwargs)
    return build_replknet(variant, pretrained, **args)


@register_model
def replknet_tiny_k31(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Tiny RepLKNet with RepLKNet-31B's kernels 31/29/27/13 (every map is smaller than its kernel)."""
    return _replknet("replknet_tiny_k31", (31, 29, 27, 13), pretrained, **kwargs)


@register_model
def replknet_tiny_k13(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Tiny RepLKNet with 13x13 kernels in every stage."""
    return _replknet("replknet_tiny_k13", (13, 13, 13, 13), pretrained, **kwargs)


@register_model
def replknet_tiny_k7(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Tiny RepLKNet with 7x7 kernels in every stage."""
    return _replknet("replknet_tiny_k7", (7, 7, 7, 7), pretrained, **kwargs)


@register_model
def replknet_tiny_k3(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Tiny RepLKNet with 3x3 kernels (no parallel small kernel): the small-kernel baseline."""
    return _replknet("replknet_tiny_k3", (3, 3, 3, 3), pretrained, **kwargs)


@register_model
def resnet_tiny(pretrained: bool = False, **kwargs) -> ResNet:
    """timm ResNet-18's layout (two basic blocks per stage) at widths 16/32/64/128, with timm's
    64-wide 7x7 stride-2 stem and max pool."""
    args = dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(16, 32, 64, 128), num_classes=10)
    args.update(kwargs)
    args.pop("fast", None)
    return build_model_with_cfg(ResNet, "resnet_tiny", pretrained, **args)


@register_model
def vit_tiny_p8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """timm VisionTransformer for 64x64 inputs: 8x8 patches, width 64, depth 4, 2 heads, MLP ratio 2."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)
    args.update(kwargs)
    args.pop("fast", None)
    return build_model_with_cfg(VisionTransformer, "vit_tiny_p8", pretrained, **args)

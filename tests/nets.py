"""Small models the analysis and attack tests share (test_analysis.py, test_attacks.py).

* ``trained_like_replknet``: a RepLKNet with trained-like BatchNorm statistics. A freshly built
  BN is the identity in eval mode, so folding it, or dropping it, would go unseen.
* ``register_fixed_size_vit``: a small timm ViT built for one image size, standing in for DINO.
"""
import torch
import torch.nn as nn


def trained_like_replknet(arch: dict, bn_weight: bool = False) -> nn.Module:
    """``RepLKNet(**arch)`` built after ``torch.manual_seed(0)``, in eval mode, each BatchNorm2d's
    running mean ~ 0.1 N(0, 1) and running variance ~ U(0.5, 1.5) (and with ``bn_weight`` its scale
    ~ U(0.5, 1.5)), drawn in module order from a generator seeded 1: the same model every call."""
    from lkfast.models import RepLKNet  # imported here: test modules skip on a missing timm first

    torch.manual_seed(0)
    model = RepLKNet(**arch)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if bn_weight:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


FIXED_SIZE_VIT = "lkfast_test_fixed_size_vit"


def register_fixed_size_vit() -> str:
    """Registers (once) and returns the name of a small timm ViT that, as DINO ViT-S/16
    (``vit_small_patch16_224.dino``), is built for one image size (timm's ``test_vit``, 160 px, is
    built for any): ``dynamic_img_size`` is off unless asked for."""
    import timm
    from timm.models import register_model

    if not timm.is_model(FIXED_SIZE_VIT):
        def lkfast_test_fixed_size_vit(pretrained=False, **kwargs):
            return timm.create_model("test_vit.r160_in1k", pretrained=pretrained,
                                     **{"dynamic_img_size": False, **kwargs})
        register_model(lkfast_test_fixed_size_vit)
    return FIXED_SIZE_VIT

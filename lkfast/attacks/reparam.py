"""An inference-only copy of a model for attacks: RepLKNet re-parameterised, every conv-BN folded.

Attacks only need input gradients of a frozen model in eval mode, so the training-time structure
(parallel small kernels, separate BNs) can be folded away first. The copy is checked against the
original on a sample batch and only returned when the outputs agree within tolerance.

Measured (benchmarks/results/attacks_cpu.md, PGD-5 on RepLKNet-31B, 2-core CPU): on lkfast's own
RepLKNet (``fast=True``) the folded copy is *slower* (1.22x the plain model against 1.70x for the
unfolded fast model), because the fast model already folds every BN, including the pre-block BNs
that ``structural_reparam`` leaves separate, into the convolutions on the fly. The evaluation
therefore attacks the fast model as it is; this helper is kept for ``fast=False`` models and for
exporting, not as a speed-up.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lkfast.models import RepLKNet


def reparameterized_for_attack(model: nn.Module, sample: torch.Tensor, rtol: float = 1e-4) -> nn.Module:
    """A deep copy of ``model`` in which every RepLKNet (the model itself or a submodule, e.g. behind
    a normalisation wrapper) has its small kernels merged and its conv-BN pairs folded
    (``structural_reparam(fuse_conv_bn=True)``), or ``model`` itself when it holds no RepLKNet.

    The model must be in eval mode (BN statistics are what gets folded); refused otherwise. The
    copy's logits on ``sample`` must equal the original's within ``rtol`` of their largest magnitude,
    else a RuntimeError says by how much they differ. The original is not modified.
    """
    if model.training:
        raise ValueError("reparameterized_for_attack: the model is in training mode; folding BN needs eval mode "
                         "(call model.eval() first)")
    if not any(isinstance(m, RepLKNet) for m in model.modules()):
        return model
    fused = copy.deepcopy(model)
    for module in fused.modules():
        if isinstance(module, RepLKNet):
            module.structural_reparam(fuse_conv_bn=True)
    fused.eval()
    with torch.no_grad():
        reference, found = model(sample).float(), fused(sample).float()
    error = float((reference - found).abs().max() / reference.abs().max().clamp_min(1e-12))
    if error > rtol:
        raise RuntimeError(f"reparameterized_for_attack: the folded model's logits differ from the original's by "
                           f"{error:.2e} (relative to the largest logit), above rtol={rtol:.0e}; attack the original")
    return fused



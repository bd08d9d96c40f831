"""Feature-map variance (the paper's Fig. 10): after the stem, each transition and each residual addition, the
spatial variance of the features."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lkfast.analysis.blocks import channels_last_outputs, variance_points


def spatial_variance(features: torch.Tensor, prefix_tokens: int = 0, channels_last: bool = False) -> float:
    """Variance over the spatial positions, averaged over batch and channels: a feature map
    (N, C, H, W), or (N, H, W, C) with ``channels_last`` (Swin's blocks), varies over H, W; a token
    sequence (N, L, C) over its L - ``prefix_tokens`` patch tokens (a ViT's class token is not a position)."""
    if features.dim() == 4:
        if channels_last:
            return float(features.float().flatten(1, 2).var(dim=1, unbiased=False).mean())
        return float(features.float().flatten(2).var(dim=2, unbiased=False).mean())
    if features.dim() == 3:
        return float(features[:, prefix_tokens:].float().var(dim=1, unbiased=False).mean())
    raise ValueError(f"spatial_variance: expected (N, C, H, W) maps or (N, L, C) tokens, got {tuple(features.shape)}")


def feature_map_variance(model: nn.Module, x: torch.Tensor, modules: Optional[list] = None) -> dict:
    """Record the spatial variance (``spatial_variance``) of the features at every point of
    ``blocks.variance_points(model)`` on the batch x (the paper: 64 validation images, centre crop
    only; x in the space the model takes): the stem's and transitions' outputs and the result of
    every residual addition, in forward order.

    The statistic is each image's variance over the spatial positions, averaged over the images and
    channels (Park & Kim 2022's, as DESIGN.md states; the paper's script averages the batch's maps
    first, then takes their spatial variance: other values, the same kind of curve).

    modules: the points to record instead, (name, module, "input" | "output") or (name, module)
    (an output); ValueError for a model of no known family by default. Maps of a model that declares
    ``output_fmt = "NHWC"`` (timm's Swin) are read as (N, H, W, C); Swin's attention residual is a
    token sequence (N, H*W, C). A point whose input is the map just recorded (a stage that starts
    with its first block, as ResNet's) is dropped rather than counted twice.
    Refuses an empty batch (the mean over no images). Hooks are removed when this returns, also after an error. The model runs in its current mode,
    without gradients.

    Returns ``{"layers": [names], "depth": [(i + 1) / L], "variance": [...], "normalized": [variance /
    its maximum over the layers]}``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or len(x) == 0:
        found = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"feature_map_variance: x must be a batch of at least one image, got {found}")
    points = variance_points(model) if modules is None else [tuple(m) + ("output",) * (len(m) == 2) for m in modules]
    if not points:
        raise ValueError(f"feature_map_variance: no block outputs to record in {type(model).__name__}")
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = next((getattr(m, "num_prefix_tokens") for m in model.modules() if hasattr(m, "num_prefix_tokens")), 0)
    channels_last = channels_last_outputs(model)
    values, last = {}, [None]  # last: the tensor recorded most recently
    handles = []

    def record(name, features):
        if features is last[0]:
            values[name] = None  # the map just recorded, reached again: one point
            return
        last[0] = features
        values[name] = spatial_variance(features, prefix, channels_last)

    try:
        for name, module, side in points:
            if side == "input":
                handles.append(module.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, name=name: record(name, out)))
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _, _ in points if name not in values]
    if missing:
        raise RuntimeError(f"feature_map_variance: the forward pass never reached {missing[:5]}")
    names = [name for name, _, _ in points if values[name] is not None]
    variance = [values[name] for name in names]
    peak = max(variance) or 1.0
    return {"layers": names, "depth": [(i + 1) / len(names) for i in range(len(names))], "variance": variance,
            "normalized": [v / peak for v in variance]}

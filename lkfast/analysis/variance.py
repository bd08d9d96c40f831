"""Feature-map variance (the paper's Fig. 10): per block output, the spatial variance of the features."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lkfast.analysis.blocks import channels_last_outputs, output_modules


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
    """Record the spatial variance (``spatial_variance``) of every block output of ``model`` on the
    batch x (the paper: 64 validation images, centre crop only; x in the space the model takes).

    modules: (name, module) pairs to record, in forward order (default ``blocks.output_modules``,
    which raises ValueError for a model of no known family). Maps of a model that declares
    ``output_fmt = "NHWC"`` (timm's Swin) are read as (N, H, W, C).
    Refuses an empty batch (the mean over no images). Hooks are removed when this returns, also after an error. The model runs in its current mode,
    without gradients.

    Returns ``{"layers": [names], "depth": [(i + 1) / L], "variance": [...], "normalized": [variance /
    its maximum over the layers]}``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or len(x) == 0:
        found = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"feature_map_variance: x must be a batch of at least one image, got {found}")
    modules = output_modules(model) if modules is None else list(modules)
    if not modules:
        raise ValueError(f"feature_map_variance: no block outputs to record in {type(model).__name__}")
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = next((getattr(m, "num_prefix_tokens") for m in model.modules() if hasattr(m, "num_prefix_tokens")), 0)
    channels_last = channels_last_outputs(model)
    values = {}
    handles = []

    def recorder(name):
        def hook(module, args, output):
            values[name] = spatial_variance(output, prefix, channels_last)
        return hook

    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(recorder(name)))
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name, _ in modules if name in values]
    if len(names) != len(modules):
        missing = [name for name, _ in modules if name not in values]
        raise RuntimeError(f"feature_map_variance: the forward pass never reached {missing[:5]}")
    variance = [values[name] for name in names]
    peak = max(variance) or 1.0
    return {"layers": names, "depth": [(i + 1) / len(names) for i in range(len(names))], "variance": variance,
            "normalized": [v / peak for v in variance]}

"""Kernel attention distance (the paper's Fig. 9): how far from its centre each depthwise kernel reaches.

For a kernel w of radius R (size 2R + 1) and each channel: distance = sum_ij |w_ij| * ||(i, j) - centre||
/ (R * sqrt(2)) (the paper's quantity), and normalised distance = distance / sum_ij |w_ij|, which is
0 for all mass at the centre and 1 for all mass in the corners (comparable across channels and layers
of different magnitude). Channels are sorted by each.

Which weights: as the paper's script (kernel_atten_dis.py), a RepLKNet layer is measured on its large
kernel's own weights, ``lkb_origin.conv.weight`` (no BN scale, no small kernel). A re-parameterised
(merged) layer holds only the merged kernel (BNs and the small kernel folded in): it is measured on
that and the result says so (its distances are scaled per channel by the BN, unlike the script's).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from lkfast.nn import ReparamLargeKernelConv

_STAGE = re.compile(r"(?:^|\.)(?:stages\.|layer)(\d+)\.")


def channel_distances(kernel: torch.Tensor) -> tuple:
    """(distance, normalised distance), one value per channel, of a depthwise kernel (C, 1, kh, kw)
    or (C, kh, kw), kh and kw odd and not both 1. Non-square kernels measure each axis in its own
    radius. A channel of all zeros gets normalised distance 0; one holding a NaN or an infinity (a
    diverged model) gets NaN, not a plausible number."""
    if kernel.dim() == 4:
        if kernel.shape[1] != 1:
            raise ValueError(f"channel_distances: expected a depthwise kernel (C, 1, kh, kw), got {tuple(kernel.shape)}")
        kernel = kernel[:, 0]
    if kernel.dim() != 3:
        raise ValueError(f"channel_distances: expected a kernel of shape (C, 1, kh, kw) or (C, kh, kw), got "
                         f"{tuple(kernel.shape)}")
    kh, kw = kernel.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or (kh == 1 and kw == 1):
        raise ValueError(f"channel_distances: the kernel needs odd sides and a radius > 0, got {kh}x{kw}")
    ry, rx = max((kh - 1) / 2, 1.0), max((kw - 1) / 2, 1.0)
    dy = (torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2) / ry
    dx = (torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2) / rx
    radius = (dy[:, None] ** 2 + dx[None, :] ** 2).sqrt() / 2 ** 0.5  # 1 at the corners
    magnitude = kernel.detach().double().abs().cpu()
    distance = (magnitude * radius).sum((-2, -1))
    mass = magnitude.sum((-2, -1))
    normalised = torch.where(mass == 0, torch.zeros_like(mass), distance / mass.clamp_min(1e-300))
    normalised = torch.where(mass.isfinite(), normalised, torch.full_like(mass, float("nan")))  # inf / inf
    return distance, normalised


# What each layer's kernel is (the "weights" field of a layer in kernel_attention_distance's result).
LARGE_KERNEL = "lkb_origin.conv.weight"  # RepLKNet's large kernel, unmerged: the paper's script measures it
MERGED_KERNEL = "lkb_reparam.weight"  # re-parameterised RepLKNet layer: BNs and small kernel folded in
CONV_WEIGHT = "weight"  # a plain depthwise nn.Conv2d (ConvNeXt, ...)


def _depthwise_kernels(model: nn.Module, min_kernel_size: int) -> list:
    """(name, kernel, weights) of ``depthwise_kernels``, weights naming which tensor was read."""
    found, inside = [], set()
    has_replk = any(isinstance(m, ReparamLargeKernelConv) for m in model.modules())
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, ReparamLargeKernelConv):
            inside.add(name)
            kernel, weights = ((module.lkb_reparam.weight, MERGED_KERNEL) if module.merged
                               else (module.lkb_origin.conv.weight, LARGE_KERNEL))
            if max(kernel.shape[-2:]) >= min_kernel_size:
                found.append((name, kernel.detach(), weights))
        elif not has_replk and isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels \
                and tuple(module.stride) == (1, 1) and max(module.kernel_size) >= min_kernel_size:
            found.append((name, module.weight.detach(), CONV_WEIGHT))
    return found


def depthwise_kernels(model: nn.Module, min_kernel_size: int = 3) -> list:
    """(name, kernel (C, 1, kh, kw)) of every depthwise large kernel of ``model``, in module order.

    In a model with RepLKNet's ``ReparamLargeKernelConv`` layers only those count (not the stem's
    3x3), each once: the large kernel's own weights (``lkb_origin.conv.weight``, as the paper's
    script), or the merged kernel of a re-parameterised layer (the only one it holds). Elsewhere:
    every stride-1 depthwise ``nn.Conv2d`` (groups == in == out channels). In both, only kernels
    whose larger side is at least ``min_kernel_size`` (ConvNeXt's 7x7, ...).
    """
    return [(name, kernel) for name, kernel, _ in _depthwise_kernels(model, min_kernel_size)]


def kernel_attention_distance(model: nn.Module, min_kernel_size: int = 3) -> dict:
    """Kernel attention distance of every depthwise large kernel of ``model`` (``depthwise_kernels``).

    Returns ``{"layers": [{"name", "stage" (index parsed from the name, or None), "kernel_size":
    [kh, kw], "channels", "weights" (the tensor measured: LARGE_KERNEL, MERGED_KERNEL or CONV_WEIGHT),
    "distance": [sorted ascending], "normalized": [sorted ascending], "mean_distance",
    "mean_normalized"}...], "weights": [the kinds measured], "note" (only where a layer is merged)}``
    in module order. Raises ValueError for a model with no depthwise kernel of at least ``min_kernel_size``.
    """
    kernels = _depthwise_kernels(model, min_kernel_size)
    if not kernels:
        raise ValueError(f"kernel_attention_distance: {type(model).__name__} has no stride-1 depthwise convolution "
                         f"with a kernel of at least {min_kernel_size}x{min_kernel_size}; the analysis applies to "
                         f"large-kernel ConvNets such as RepLKNet or ConvNeXt")
    layers = []
    for name, kernel, weights in kernels:
        distance, normalised = channel_distances(kernel)
        match = _STAGE.search(name + ".")
        layers.append({"name": name, "stage": int(match.group(1)) if match else None,
                       "kernel_size": list(kernel.shape[-2:]), "channels": int(kernel.shape[0]), "weights": weights,
                       "distance": distance.sort().values.tolist(), "normalized": normalised.sort().values.tolist(),
                       "mean_distance": float(distance.mean()), "mean_normalized": float(normalised.mean())})
    result = {"layers": layers, "weights": sorted({layer["weights"] for layer in layers})}
    if MERGED_KERNEL in result["weights"]:
        result["note"] = ("re-parameterised layers measured on their merged kernel (BNs and the small kernel folded "
                          "in, the only kernel the checkpoint holds), not on the large kernel's own weights as the "
                          "paper's script: distances are scaled per channel by the BN")
    return result


def paper_layers(result: dict, first_stage: Optional[int] = None, last_stage: Optional[int] = None) -> list:
    """The layers the paper plots: the first two of the first stage and the last two of the third
    (``first_stage``/``last_stage`` override the stage indices; without stage indices, the first
    two and last two layers)."""
    layers = result["layers"]
    stages = sorted({layer["stage"] for layer in layers if layer["stage"] is not None})
    if not stages:
        return layers[:2] + layers[-2:] if len(layers) > 4 else list(layers)
    first = stages[0] if first_stage is None else first_stage
    last = (stages[2] if len(stages) > 2 else stages[-1]) if last_stage is None else last_stage
    head = [layer for layer in layers if layer["stage"] == first][:2]
    tail = [layer for layer in layers if layer["stage"] == last][-2:]
    return head + [layer for layer in tail if layer not in head]

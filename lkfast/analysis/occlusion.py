"""Patch-drop occlusion (the paper's Fig. 4-5): zero whole 16-px patches in [0, 1] pixel space.

Three ways to choose the patches, at a drop ratio K in [0, 1]:

* ``random``: exactly floor(K * patches) patches per image, drawn uniformly (the paper's script drops
  ``count * 196 // 10`` of 196 at K = count / 10);
* ``salient``: the patches holding the top K of the saliency mass (sort ascending, normalise to sum 1,
  accumulate; drop where the cumulative sum exceeds 1 - K), so K is a share of attention, not of pixels;
* ``non_salient``: the patches holding the bottom K of the mass (cumulative sum <= K).

Saliency is DINO ViT-S/16's CLS-to-patch attention (``dino_attention``), or, where the data has
ground-truth foreground masks, each patch's foreground share (``mask_saliency``). With masks the
background holds no foreground mass at all, so ``non_salient`` drops the top K of the *background*
mass instead (the share of each patch that is background); on attention maps it is as above.
An image with no mass to drop (no foreground in ``salient``, all foreground in ``non_salient``
with masks) keeps every patch: there is nothing of that kind to occlude.
"""
from __future__ import annotations

import math

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfast.attacks.core import Generators, check_images, generator_device, is_integer, seeded, uniform
from lkfast.attacks.evaluate import model_device

MODES = ("random", "salient", "non_salient")
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PATCH_SIZE = 16
DINO_MODEL = "vit_small_patch16_224.dino"


def check_ratio(name: str, ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name}: the drop ratio must be a number in [0, 1] (0.5 drops half), got {ratio!r}")


def check_patch_size(patch_size: int) -> None:
    if not is_integer(patch_size) or patch_size < 1:
        raise ValueError(f"occlusion: patch_size is the side of a square patch in pixels, an integer >= 1, "
                         f"got {patch_size!r}")


def patch_grid(height: int, width: int, patch_size: int = PATCH_SIZE) -> tuple:
    """(rows, columns) of patches; the image sides must be multiples of ``patch_size``."""
    check_patch_size(patch_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"occlusion: image size {height}x{width} is not a multiple of the patch size {patch_size}; "
                         f"resize or crop the images (224 px gives the paper's 14x14 grid)")
    return height // patch_size, width // patch_size


def random_patch_mask(batch: int, grid: tuple, ratio: float, generator: Generators = None,
                      device=None) -> torch.Tensor:
    """Boolean (batch, rows, cols) mask with exactly floor(ratio * rows * cols) True (dropped)
    patches per image (19 of 196 at 10%, as the paper's script counts them), chosen uniformly at random
    with ``generator`` (one, or one per image)."""
    check_ratio("random_patch_mask", ratio)
    generator = seeded(generator, device or "cpu", "random_patch_mask")
    total = grid[0] * grid[1]
    keys = uniform((batch, total), generator, device)
    order = keys.argsort(dim=1)
    mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
    count = math.floor(ratio * total + 1e-9)  # (0.7 * 10 is 7.000000000000001, 0.29 * 100 28.999999999999996)
    mask.scatter_(1, order[:, :count], True)
    return mask.view(batch, *grid)


def saliency_patch_mask(saliency: torch.Tensor, ratio: float, mode: str) -> torch.Tensor:
    """Boolean mask, saliency's shape (N, rows, cols), of the patches holding the top (``salient``)
    or bottom (``non_salient``) share ``ratio`` of each image's saliency mass (see the module
    docstring). Saliency must be non-negative; an image whose saliency sums to 0 (no foreground in
    its mask) has no mass to drop and keeps every patch (all False)."""
    check_ratio("saliency_patch_mask", ratio)
    if mode not in ("salient", "non_salient"):
        raise ValueError(f"saliency_patch_mask: mode must be 'salient' or 'non_salient', got {mode!r}")
    flat = saliency.flatten(1).double()
    if (flat < 0).any():
        raise ValueError("saliency_patch_mask: saliency must be non-negative")
    values, order = flat.sort(dim=1)
    total = values.sum(1, keepdim=True)
    cumulative = (values / total.clamp_min(1e-300)).cumsum(1)
    tol = 1e-6  # cumulative sums of exact shares (e.g. 0.3, given in float32) land a rounding error away
    chosen = cumulative > 1 - ratio + tol if mode == "salient" else cumulative <= ratio + tol
    chosen &= total > 0  # nothing to drop in an image without mass
    mask = torch.zeros_like(chosen)
    mask.scatter_(1, order, chosen)
    return mask.view(saliency.shape)


def occlude(x: torch.Tensor, patch_mask: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """x (N, C, H, W, in [0, 1] pixel space) with every patch marked True in ``patch_mask``
    (N, H / patch_size, W / patch_size) set to zero (black)."""
    grid = patch_grid(x.shape[-2], x.shape[-1], patch_size)
    if tuple(patch_mask.shape) != (x.shape[0], *grid):
        raise ValueError(f"occlude: patch mask of shape {tuple(patch_mask.shape)} does not match {x.shape[0]} images "
                         f"with a {grid[0]}x{grid[1]} patch grid")
    pixels = patch_mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return x.masked_fill(pixels[:, None].to(x.device), 0.0)


def mask_saliency(masks: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Foreground share of every patch, (N, rows, cols) in [0, 1], from masks (N, H, W) or (N, 1, H, W)
    (non-zero = foreground)."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    grid = patch_grid(masks.shape[-2], masks.shape[-1], patch_size)
    return F.avg_pool2d((masks != 0).float()[:, None], patch_size).view(masks.shape[0], *grid)


def load_dino(checkpoint: Optional[str], device="cpu", pretrained: bool = False) -> nn.Module:
    """DINO ViT-S/16 (timm ``vit_small_patch16_224.dino``) from a local checkpoint file (timm's
    safetensors/pth or the official ``dino_deitsmall16_pretrain.pth``), in eval mode; with no checkpoint
    and ``pretrained``, timm's published weights (its hub cache or the network; RuntimeError, saying
    so, where neither has them). Nothing else is downloaded.

    Built with timm's ``dynamic_img_size``: it takes images of any size the occlusion's patch grid
    takes (sides multiples of 16 px), and its attention map is on that grid, one value per 16-px
    patch the occlusion drops (the position embeddings resampled to the grid; at 224 px they are used
    as they are, so the map is the one of a ViT built for 224 px alone).

    Refuses (ValueError) no checkpoint without ``pretrained``: that would be a randomly initialised
    ViT, whose attention picks patches at random while the occlusion calls them salient."""
    from lkfast.models import create_model

    if not checkpoint:
        checkpoint = None
        if not pretrained:
            raise ValueError(f"load_dino: no checkpoint and pretrained=False would give a randomly initialised "
                             f"{DINO_MODEL}, whose attention picks no salient patches: pass a local checkpoint file "
                             f"of DINO ViT-S/16 or pretrained=True (timm's published weights)")

    return create_model(DINO_MODEL, checkpoint=checkpoint, pretrained=pretrained and checkpoint is None,
                        fast=False, dynamic_img_size=True).to(device)


def dino_attention(vit: nn.Module, x: torch.Tensor, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, head: Optional[int] = None) -> torch.Tensor:
    """CLS-to-patch attention of the last block of a timm VisionTransformer, of one ``head`` or
    (None) averaged over the heads: (N, rows, cols), each image's map summing to at most 1 (the CLS
    token's own share is left out).

    x: (N, 3, H, W) in [0, 1]; it is normalised with ``mean``/``std`` (default: the ViT's
    ``pretrained_cfg``) before the ViT sees it. The ViT is run in the mode it is in, without gradients
    (the map is attached to no autograd graph).
    A ViT built for one image size (timm's default) takes that size alone (ValueError for another);
    built with ``dynamic_img_size=True`` (as ``load_dino`` builds it), any multiple of its patch size.
    """
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not hasattr(vit, "patch_embed") or not hasattr(blocks[-1], "attn"):
        raise ValueError(f"dino_attention: expected a timm VisionTransformer (with patch_embed and blocks), got "
                         f"{type(vit).__name__}")
    built_for = getattr(vit.patch_embed, "img_size", None)
    if built_for is not None and not getattr(vit, "dynamic_img_size", False) \
            and tuple(built_for) != tuple(x.shape[-2:]):
        raise ValueError(f"dino_attention: the ViT was built for {built_for[0]}x{built_for[1]} images and takes no "
                         f"other size; these are {x.shape[-2]}x{x.shape[-1]}: build it with dynamic_img_size=True "
                         f"(as load_dino does) for any size on its patch grid")
    cfg = getattr(vit, "pretrained_cfg", {}) or {}
    mean = torch.tensor(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)), device=x.device)
    std = torch.tensor(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)), device=x.device)
    last = blocks[-1]
    attn = last.attn
    heads = attn.num_heads
    if head is not None and not -heads <= head < heads:
        raise ValueError(f"dino_attention: head {head} of a ViT with {heads} heads")
    captured = {}
    handle = last.norm1.register_forward_hook(lambda module, args, output: captured.__setitem__("tokens", output))
    with torch.no_grad():  # the forward and the attention recomputed from its tokens: no graph kept
        try:
            vit((x - mean[:, None, None]) / std[:, None, None])
        finally:
            handle.remove()
        tokens = captured["tokens"]
        n, length, dim = tokens.shape
        head_dim = getattr(attn, "head_dim", dim // heads)
        q, k, _ = attn.qkv(tokens).reshape(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        scale = getattr(attn, "scale", head_dim ** -0.5)
        weights = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    prefix = getattr(vit, "num_prefix_tokens", 1)
    cls_to_patches = weights[:, :, 0, prefix:].mean(1) if head is None else weights[:, head, 0, prefix:]
    patch = vit.patch_embed.patch_size
    return cls_to_patches.reshape(n, x.shape[-2] // patch[0], x.shape[-1] // patch[1])


# The head whose attention map picks the salient patches: the authors' script takes head 1 of DINO
# ViT-S/16's last block (LKRobust, occlusion_invariance/evaluate.py: head_number = 1); the paper's
# text names none. None averages the heads.
DINO_HEAD = 1


def dino_saliency(vit: nn.Module, head: Optional[int] = DINO_HEAD) -> Callable[[torch.Tensor], torch.Tensor]:
    """A saliency function for ``occlusion_sweep``: images -> ``dino_attention(vit, images, head=head)``."""
    device = model_device(vit)
    return lambda x: dino_attention(vit, x.to(device), head=head).to(x.device)


def drop_masks(x: torch.Tensor, ratio: float, mode: str, saliency: Optional[torch.Tensor] = None,
               from_masks: bool = False, patch_size: int = PATCH_SIZE,
               generator: Generators = None) -> torch.Tensor:
    """The patch mask of one occlusion type for a batch (``random`` needs no saliency; its patches
    are drawn with ``generator``, one or one per image, on the generator's device)."""
    if mode not in MODES:
        raise ValueError(f"occlusion: mode must be one of {MODES}, got {mode!r}")
    grid = patch_grid(x.shape[-2], x.shape[-1], patch_size)
    generator = seeded(generator, "cpu", "occlusion")  # an int seed: a CPU generator, as occlusion_sweep's
    if mode == "random":
        return random_patch_mask(x.shape[0], grid, ratio, generator=generator, device=generator_device(generator))
    if saliency is None:
        raise ValueError(f"occlusion: mode {mode!r} needs a saliency map (DINO attention or ground-truth masks)")
    if tuple(saliency.shape) != (x.shape[0], *grid):
        raise ValueError(f"occlusion: saliency of shape {tuple(saliency.shape)} does not match the {grid[0]}x{grid[1]} "
                         f"patch grid of {x.shape[0]} images of {x.shape[-2]}x{x.shape[-1]}")
    if from_masks and mode == "non_salient":
        return saliency_patch_mask(1.0 - saliency, ratio, "salient")
    return saliency_patch_mask(saliency, ratio, mode)


def occlusion_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ratios: Sequence[float] = RATIOS,
                       modes: Sequence[str] = MODES, patch_saliency: Optional[torch.Tensor] = None,
                       from_masks: bool = False, patch_size: int = PATCH_SIZE,
                       generator: Generators = None) -> dict:
    """Per-image outcomes of one batch of the occlusion sweep (x in [0, 1], y labels; moved to the
    model's device). patch_saliency: (N, rows, cols) saliency of the batch (``mask_saliency`` of its
    masks with ``from_masks=True``, or attention), needed by the salient/non-salient modes.
    Random patches are drawn from ``generator`` (on the CPU or x's device; one, or one per image),
    mode by mode, ratio by ratio.

    Returns ``{"clean": bool (N,), "correct": bool (N, modes, ratios), "dropped": int (N, modes,
    ratios) patches dropped}``; ``occlusion_summary`` turns the rows of any number of batches into
    the sweep's result. Refuses images outside [0, 1] (as the attacks do: the dropped patches are
    black in [0, 1] pixel space)."""
    check_images("occlusion_sweep", x, y)
    device = model_device(model)
    y = y.to(device)
    generator = seeded(generator, "cpu", "occlusion")  # once: every mode and ratio continue its stream
    correct = torch.zeros(len(y), len(modes), len(ratios), dtype=torch.bool, device=device)
    dropped = torch.zeros(len(y), len(modes), len(ratios), dtype=torch.long)
    with torch.no_grad():
        clean = model(x.to(device)).argmax(1) == y
        for i, mode in enumerate(modes):
            for j, ratio in enumerate(ratios):
                mask = drop_masks(x, ratio, mode, patch_saliency, from_masks, patch_size, generator)
                dropped[:, i, j] = mask.flatten(1).sum(1).cpu()
                correct[:, i, j] = model(occlude(x, mask, patch_size).to(device)).argmax(1) == y
    return {"clean": clean, "correct": correct, "dropped": dropped}


def occlusion_summary(records: dict, ratios: Sequence[float], modes: Sequence[str], grid: Sequence[int],
                      patch_size: int = PATCH_SIZE, saliency=None) -> dict:
    """The occlusion sweep's result from ``occlusion_outcomes`` rows of every image (concatenated)."""
    count = len(records["clean"])
    if count == 0:
        raise ValueError("occlusion_sweep: the loader yielded no images")
    correct = records["correct"].long().sum(0).tolist()
    dropped = records["dropped"].long().sum(0).tolist()
    patches = grid[0] * grid[1]
    return {"ratios": list(map(float, ratios)), "clean_top1": 100.0 * int(records["clean"].sum()) / count,
            "top1": {m: [100.0 * c / count for c in correct[i]] for i, m in enumerate(modes)},
            "dropped_fraction": {m: [d / (patches * count) for d in dropped[i]] for i, m in enumerate(modes)},
            "patch_size": patch_size, "grid": list(grid),
            "saliency": saliency if isinstance(saliency, str) or saliency is None else "function", "images": count}


def check_occlusion(ratios: Sequence[float], modes: Sequence[str], saliency, patch_size: int = PATCH_SIZE) -> None:
    """Refuse ratios outside [0, 1], unknown modes, a saliency other than None, ``"masks"`` or a
    function, salient modes without a saliency source, and a patch size that is no integer >= 1."""
    check_patch_size(patch_size)
    if not (saliency is None or callable(saliency) or (isinstance(saliency, str) and saliency == "masks")):
        raise ValueError(f"occlusion_sweep: saliency must be None, 'masks' (ground-truth masks in the loader) or a "
                         f"function images -> (N, rows, cols) saliency such as dino_saliency(load_dino(path)), "
                         f"got {saliency!r}")
    for ratio in ratios:
        check_ratio("occlusion_sweep", ratio)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"occlusion_sweep: unknown modes {bad}; choose from {MODES}")
    if saliency is None and any(m != "random" for m in modes):
        raise ValueError("occlusion_sweep: salient/non_salient drops need saliency='masks' (ground-truth masks in the "
                         "loader) or a saliency function such as dino_saliency(load_dino(path))")


def batch_saliency(x: torch.Tensor, masks: Optional[torch.Tensor], saliency, modes: Sequence[str],
                   patch_size: int = PATCH_SIZE) -> Optional[torch.Tensor]:
    """The patch saliency ``occlusion_outcomes`` needs for a batch: the masks' foreground shares
    (saliency ``"masks"``), the saliency function's map, or None when only random drops run."""
    if saliency == "masks":
        if masks is None:
            raise ValueError("occlusion_sweep: saliency='masks' needs (images, labels, masks) batches")
        return mask_saliency(masks, patch_size)
    return saliency(x) if callable(saliency) and any(m != "random" for m in modes) else None


def occlusion_sweep(model: nn.Module, loader: Iterable, ratios: Sequence[float] = RATIOS,
                    modes: Sequence[str] = MODES, saliency: Optional[Callable] = None, patch_size: int = PATCH_SIZE,
                    seed: int = 0, max_batches: Optional[int] = None) -> dict:
    """Top-1 (percent) of ``model`` on occluded images, for every mode and drop ratio.

    loader: (images in [0, 1], labels[, masks]) batches. saliency: ``"masks"`` (the loader's third
    item, ground-truth foreground masks), a function images -> (N, rows, cols) saliency (e.g.
    ``dino_saliency(load_dino(path))``), or None (then only ``random`` may be asked for). Random
    draws come from a generator seeded with ``seed`` (the same patches for every model).

    Refuses, before any batch, ratios outside [0, 1], unknown modes, another saliency, salient modes
    without one and a patch size that is no integer >= 1; and batches whose images are not in [0, 1]
    (normalisation belongs inside the model: patches are dropped to black in pixel space).

    Returns ``{"ratios": [...], "clean_top1": float, "top1": {mode: [...]}, "dropped_fraction":
    {mode: [mean share of patches dropped]}, "patch_size", "grid", "saliency", "images"}``.
    A loop of ``occlusion_outcomes`` over the batches and ``occlusion_summary``.
    """
    check_occlusion(ratios, modes, saliency, patch_size)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    grid = None
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0], batch[1]
        grid = patch_grid(x.shape[-2], x.shape[-1], patch_size)
        patch_saliency = batch_saliency(x, batch[2] if len(batch) > 2 else None, saliency, modes, patch_size)
        for name, value in occlusion_outcomes(model, x, y, ratios, modes, patch_saliency, saliency == "masks",
                                              patch_size, generator).items():
            rows.setdefault(name, []).append(value.cpu())
    if not rows:
        raise ValueError("occlusion_sweep: the loader yielded no images")
    return occlusion_summary({k: torch.cat(v) for k, v in rows.items()}, ratios, modes, grid, patch_size, saliency)

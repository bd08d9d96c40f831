"""Lesion study (the paper's Fig. 7): accuracy when n whole residual blocks are removed after training."""
from __future__ import annotations

import random
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from lkfast.analysis.blocks import Block, blocks_removed, residual_blocks
from lkfast.attacks.evaluate import batches, model_device

SCOPES = ("all", "paper")


def lesion_candidates(model: nn.Module, scope: str = "all") -> list:
    """The blocks a lesion draw may remove. ``"all"``: every shape-preserving residual block
    (``lkfast.analysis.blocks.residual_blocks``). ``"paper"``: for a staged model (RepLKNet,
    ConvNeXt, ResNet) only the stage holding the most blocks (RepLKNet-31B's third stage, 18 blocks,
    as the paper's script draws); for a ViT every block."""
    if scope not in SCOPES:
        raise ValueError(f"lesion_candidates: scope must be one of {SCOPES}, got {scope!r}")
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(f"lesion: {type(model).__name__} has no residual block whose removal keeps every shape "
                         "(a block with a downsampling or projection shortcut cannot be removed), so there is "
                         "nothing to lesion")
    if scope == "all" or blocks[0].stage is None:
        return blocks
    counts = {}
    for b in blocks:
        counts[b.stage] = counts.get(b.stage, 0) + 1
    widest = max(counts, key=lambda s: (counts[s], s))
    return [b for b in blocks if b.stage == widest]


def default_counts(total: int) -> list:
    """Block counts at fractions 0.1, 0.2, ..., 0.9 of ``total`` (rounded, at least 1, no repeats)."""
    return sorted({max(1, round(total * f / 10)) for f in range(1, 10)} - {total} or {1})


def _accuracy(model: nn.Module, data: Sequence) -> float:
    correct = count = 0
    with torch.no_grad():
        for x, y in data:
            correct += int((model(x).argmax(1) == y).sum())
            count += len(y)
    return 100.0 * correct / count


def lesion_sweep(model: nn.Module, loader: Iterable, counts: Optional[Sequence[int]] = None, draws: int = 10,
                 seed: int = 0, scope: str = "all", max_batches: Optional[int] = None) -> dict:
    """Top-1 (percent) with n random blocks removed, ``draws`` seeded draws for each n in ``counts``
    (default: 10%..90% of the candidates), blocks drawn among ``lesion_candidates(model, scope)``.

    The loader's batches are read once and kept in memory (use ``max_batches`` to bound them). The
    model is evaluated in the mode it is in (use eval mode) and restored after every draw: the same
    modules are back in place when this returns, also after an error.

    Returns ``{"candidates": [block names], "clean_top1": float, "counts": [n...], "fraction": [n /
    candidates...], "mean": [...], "min": [...], "max": [...], "draws": [[top1 per draw]...],
    "removed": [[[names removed] per draw]...], "draws_per_count", "seed", "scope", "images"}``.
    """
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"lesion_sweep: draws must be an integer >= 1, got {draws!r}")
    candidates = lesion_candidates(model, scope)
    total = len(candidates)
    counts = default_counts(total) if counts is None else list(counts)
    for n in counts:
        if not isinstance(n, int) or not 0 <= n <= total:
            raise ValueError(f"lesion_sweep: each count must be an integer in 0..{total} (the number of candidate "
                             f"blocks), got {n!r}")
    data = list(batches(loader, model_device(model), max_batches))
    if not data:
        raise ValueError("lesion_sweep: the loader yielded no images")
    rng = random.Random(seed)
    result = {"candidates": [b.name for b in candidates], "clean_top1": _accuracy(model, data), "counts": counts,
              "fraction": [n / total for n in counts], "mean": [], "min": [], "max": [], "draws": [], "removed": [],
              "draws_per_count": draws, "seed": seed, "scope": scope, "images": sum(len(y) for _, y in data)}
    for n in counts:
        accuracies, removed = [], []
        for _ in range(draws):
            chosen: list[Block] = sorted(rng.sample(candidates, n), key=lambda b: b.index)
            with blocks_removed(model, chosen):
                accuracies.append(_accuracy(model, data))
            removed.append([b.name for b in chosen])
        result["draws"].append(accuracies)
        result["removed"].append(removed)
        result["mean"].append(sum(accuracies) / draws)
        result["min"].append(min(accuracies))
        result["max"].append(max(accuracies))
    return result

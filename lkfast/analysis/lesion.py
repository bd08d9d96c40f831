"""Lesion study (the paper's Fig. 7): accuracy when n whole residual blocks are removed after training."""
from __future__ import annotations

import random
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from lkfast.analysis.blocks import Block, all_blocks, blocks_removed, residual_blocks
from lkfast.attacks.core import is_integer
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


class LesionPlan:
    """The blocks a lesion sweep removes: for each n in ``counts``, ``draws`` seeded random sets of n
    blocks among ``lesion_candidates(model, scope)`` (``removed[c][d]``, in model order). Drawn once,
    so every batch (and every shard of an evaluation) removes the same blocks. ``model_blocks``: how
    many blocks the model has (``all_blocks``), the denominator of the proportion removed."""

    def __init__(self, model: nn.Module, counts: Optional[Sequence[int]] = None, draws: int = 10, seed: int = 0,
                 scope: str = "all"):
        if not is_integer(draws) or draws < 1:
            raise ValueError(f"lesion_sweep: draws must be an integer >= 1, got {draws!r}")
        self.candidates = lesion_candidates(model, scope)
        self.model_blocks = len(all_blocks(model))
        total = len(self.candidates)
        self.counts = default_counts(total) if counts is None else list(counts)
        for n in self.counts:
            if not is_integer(n) or not 0 <= n <= total:
                raise ValueError(f"lesion_sweep: each count must be an integer in 0..{total} (the number of candidate "
                                 f"blocks), got {n!r}")
        self.counts = [int(n) for n in self.counts]  # NumPy integers too; the result holds Python ints
        self.draws, self.seed, self.scope = int(draws), int(seed) if is_integer(seed) else seed, scope
        rng = random.Random(self.seed)
        self.removed: List[List[List[Block]]] = [
            [sorted(rng.sample(self.candidates, n), key=lambda b: b.index) for _ in range(draws)] for n in self.counts]

    def names(self) -> List[List[List[str]]]:
        """The removed blocks' names, [count][draw] -> [names]."""
        return [[[b.name for b in chosen] for chosen in per_count] for per_count in self.removed]


def lesion_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: LesionPlan) -> dict:
    """Per-image outcomes of one batch: ``{"clean": bool (N,), "correct": bool (N, counts, draws)}``
    (correct prediction with every block in place, and with each planned set removed). The model is
    evaluated in the mode it is in and restored after every draw, also after an error."""
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    correct = torch.zeros(len(y), len(plan.counts), plan.draws, dtype=torch.bool, device=device)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        for c, per_count in enumerate(plan.removed):
            for d, chosen in enumerate(per_count):
                with blocks_removed(model, chosen):
                    correct[:, c, d] = model(x).argmax(1) == y
    return {"clean": clean, "correct": correct}


def lesion_summary(records: dict, plan: LesionPlan) -> dict:
    """The lesion sweep's result from ``lesion_outcomes`` rows of every image (concatenated)."""
    count = len(records["clean"])
    if count == 0:
        raise ValueError("lesion_sweep: the loader yielded no images")
    draws = [[100.0 * c / count for c in per_count] for per_count in records["correct"].long().sum(0).tolist()]
    # The paper's x-axis: the proportion of the model's blocks removed (ViT-B has half RepLKNet's 24
    # blocks), not of the candidates (RepLKNet-31B's 18 third-stage blocks under scope "paper").
    return {"candidates": [b.name for b in plan.candidates], "clean_top1": 100.0 * int(records["clean"].sum()) / count,
            "counts": list(plan.counts), "fraction": [n / plan.model_blocks for n in plan.counts],
            "candidate_fraction": [n / len(plan.candidates) for n in plan.counts], "model_blocks": plan.model_blocks,
            "mean": [sum(a) / plan.draws for a in draws], "min": [min(a) for a in draws],
            "max": [max(a) for a in draws],
            "draws": draws, "removed": plan.names(), "draws_per_count": plan.draws, "seed": plan.seed,
            "scope": plan.scope, "images": count}


def lesion_sweep(model: nn.Module, loader: Iterable, counts: Optional[Sequence[int]] = None, draws: int = 10,
                 seed: int = 0, scope: str = "all", max_batches: Optional[int] = None) -> dict:
    """Top-1 (percent) with n random blocks removed, ``draws`` seeded draws for each n in ``counts``
    (default: 10%..90% of the candidates), blocks drawn among ``lesion_candidates(model, scope)``
    (``LesionPlan``).

    Every batch is evaluated with each draw's blocks removed (``lesion_outcomes``). The model is
    evaluated in the mode it is in (use eval mode) and restored after every draw: the same modules
    are back in place when this returns, also after an error.

    Returns ``{"candidates": [block names], "clean_top1": float, "counts": [n...], "fraction": [n /
    model_blocks...] (the proportion of the model's blocks removed, Fig. 7's x-axis), "candidate_fraction":
    [n / candidates...], "model_blocks", "mean": [...], "min": [...], "max": [...], "draws": [[top1 per
    draw]...], "removed": [[[names removed] per draw]...], "draws_per_count", "seed", "scope", "images"}``.
    """
    plan = LesionPlan(model, counts, draws, seed, scope)
    rows = {}
    for x, y in batches(loader, model_device(model), max_batches):
        for name, value in lesion_outcomes(model, x, y, plan).items():
            rows.setdefault(name, []).append(value.cpu())
    if not rows:
        raise ValueError("lesion_sweep: the loader yielded no images")
    return lesion_summary({k: torch.cat(v) for k, v in rows.items()}, plan)

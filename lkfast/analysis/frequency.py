"""Robustness to noise frequency (the paper's Fig. 8): accuracy drop under band-limited sign noise."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from lkfast.attacks.core import Generators, check_budget, check_images, seeded
from lkfast.attacks.evaluate import batches, model_device
from lkfast.ops import frequency_noise
from lkfast.ops.frequency import check_band

FREQUENCIES = tuple(i * math.pi / 10 for i in range(11))  # 0, 0.1 pi, ..., pi
WIDTH = 0.1 * math.pi
NOISE_EPS = 0.1  # the noise amplitude (pixel units) of Fig. 8: lkfast's choice, the paper states the band, not this


def check_frequency(frequencies: Sequence[float], eps: float) -> None:
    """Refuse a band centre outside [0, pi] and eps outside [0, 1] (pixel units: 8 is 8/255)."""
    check_budget("frequency_sweep", eps, what="the noise amplitude")
    for f in frequencies:
        check_band(f, eps, "frequency_sweep")
    check_band(0.0, eps, "frequency_sweep")  # eps, also for an empty list


def frequency_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, frequencies: Sequence[float] = FREQUENCIES,
                       eps: float = NOISE_EPS, width: float = WIDTH, generator: Generators = None) -> dict:
    """Per-image outcomes of one batch: ``{"clean": bool (N,), "correct": bool (N, frequencies)}``,
    the noise of each band drawn band by band from ``generator`` (on the model's device), or, given
    one generator per image, each image's noise from its own. Refuses images outside [0, 1] (the
    noise is clamped to that range: a normalised image would be cut) and what ``check_frequency`` does."""
    check_frequency(frequencies, eps)
    check_images("frequency_sweep", x, y)
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    generator = seeded(generator, device, "frequency_outcomes")

    def noisy(f):
        if generator is None or isinstance(generator, torch.Generator):
            return frequency_noise(x, float(f), width=width, eps=eps, generator=generator)
        if len(generator) != len(x):
            raise ValueError(f"frequency_outcomes: {len(x)} images need one generator each, got {len(generator)}")
        return torch.cat([frequency_noise(x[i:i + 1], float(f), width=width, eps=eps, generator=g)
                          for i, g in enumerate(generator)]) if len(x) else x
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        correct = [model(noisy(f)).argmax(1) == y for f in frequencies]
    return {"clean": clean, "correct": torch.stack(correct, 1) if correct else torch.zeros(len(y), 0, dtype=torch.bool)}


def frequency_summary(records: dict, frequencies: Sequence[float], eps: float, width: float = WIDTH) -> dict:
    """The frequency sweep's result from ``frequency_outcomes`` rows of every image (concatenated)."""
    count = len(records["clean"])
    if count == 0:
        raise ValueError("frequency_sweep: the loader yielded no images")
    clean_top1 = 100.0 * int(records["clean"].sum()) / count
    top1 = [100.0 * c / count for c in records["correct"].long().sum(0).tolist()]
    return {"frequencies": list(map(float, frequencies)), "frequencies_over_pi": [f / math.pi for f in frequencies],
            "top1": top1, "drop": [clean_top1 - t for t in top1], "clean_top1": clean_top1, "eps": float(eps),
            "width": float(width), "images": count}


def frequency_sweep(model: nn.Module, loader: Iterable, frequencies: Sequence[float] = FREQUENCIES,
                    eps: float = NOISE_EPS, width: float = WIDTH, seed: int = 0, max_batches: Optional[int] = None) -> dict:
    """Top-1 (percent) of ``model`` on images plus ``lkfast.ops.frequency_noise(x, f, width, eps)``
    for every band centre f (radians per pixel, 0..pi), and the drop from clean accuracy.

    The noise of every batch and band is drawn from a generator seeded with ``seed`` (the same noise
    for every model). Returns ``{"frequencies": [...], "frequencies_over_pi": [...], "top1": [...],
    "drop": [clean - noisy, percentage points], "clean_top1", "eps", "width", "images"}``.
    loader: (images in [0, 1], labels, ...) batches (normalisation belongs inside the model: the
    noisy images are clamped to [0, 1]). Refuses a band centre outside [0, pi], eps outside [0, 1]
    (pixel units: 8/255, not 8) and batches that are not [0, 1] images, as the attacks do.
    """
    check_frequency(frequencies, eps)
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = {}
    for x, y in batches(loader, device, max_batches):
        for name, value in frequency_outcomes(model, x, y, frequencies, eps, width, generator).items():
            rows.setdefault(name, []).append(value.cpu())
    if not rows:
        raise ValueError("frequency_sweep: the loader yielded no images")
    return frequency_summary({k: torch.cat(v) for k, v in rows.items()}, frequencies, eps, width)

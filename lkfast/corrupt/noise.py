"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise, speckle_noise.

Parameters per severity 1..5 are those of the ImageNet-C release (Hendrycks & Dietterich, ICLR
2019, github.com/hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py). Noise acts per
pixel, so none of them depends on the image size.
"""
from __future__ import annotations

import torch

from . import _base, utils

GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)   # std of additive N(0, c^2)
SHOT_NOISE = (60, 25, 12, 5, 3)                    # photons per unit intensity: Poisson(x c) / c
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)    # fraction of salt-and-pepper values (skimage 's&p')
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)      # std of multiplicative noise: x + x N(0, c^2)


def gaussian_noise(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    c = GAUSSIAN_NOISE[severity - 1]
    return (x + c * utils.randn(x.shape, generator, x.device)).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    c = SHOT_NOISE[severity - 1]
    return (_base.poisson_counts(x, c, generator) / c).clamp(0, 1)


def impulse_noise(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    # skimage.util.random_noise(mode='s&p', salt_vs_pepper=0.5): each value independently is
    # replaced with probability `amount`, by 1 or 0 with equal odds.
    amount = IMPULSE_NOISE[severity - 1]
    # One uniform per value does both draws: u <= amount replaces it (probability amount), and
    # given that, u <= amount / 2 (probability 1/2) makes it salt.
    u = utils.rand(x.shape, generator, x.device)
    return torch.where(u <= amount, (u <= amount / 2).to(x.dtype), x)


def speckle_noise(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    c = SPECKLE_NOISE[severity - 1]
    return (x + x * c * utils.randn(x.shape, generator, x.device)).clamp(0, 1)

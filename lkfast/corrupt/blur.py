"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur, gaussian_blur.

Parameters per severity 1..5 are those of the ImageNet-C release (Hendrycks & Dietterich, ICLR
2019, make_imagenet_c.py). Radii, sigmas and glass-blur displacements are lengths in 224-px
pixels; they are multiplied by ``size_scale`` = s = min(H, W) / 224 (zoom factors are ratios and
stay as they are). Below 224 px the defocus disk, the Gaussians and the motion-blur lines are the
release's 224-px kernels carried to the smaller grid (``_filters.splat_matrix``), not kernels
drawn at the scaled length: at 64 px the release's severity-1 disk (radius 3) and Gaussian
(sigma 1) would be drawn narrower than a pixel, that is, not at all.
"""
from __future__ import annotations

import math

import torch

from . import _base, _filters, utils

DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))        # disk radius, alias-blur sigma
GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max shift, passes
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))            # ImageMagick radius, sigma
# np.arange(1, stop, step) of the release, written out (float rounding makes the first one 12 long).
ZOOM_BLUR = tuple(tuple(1 + step * k for k in range(count))
                  for step, count in ((0.01, 12), (0.01, 16), (0.02, 11), (0.02, 13), (0.03, 11)))
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)                                          # sigma


def _gaussian_taps(size: int, sigma: float) -> torch.Tensor:
    # cv2.getGaussianKernel(size, sigma)
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-t * t / (2 * sigma * sigma))
    return w / w.sum()


def disk_kernel(radius: float, alias_blur: float, large: bool, half: int) -> torch.Tensor:
    """The release's anti-aliased disk: a normalised binary disk of the given radius on a
    (2 half + 1)^2 grid, Gaussian-blurred (3x3, or 5x5 for radii above 8) with OpenCV's default
    reflect-101 border."""
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((taps[None, :] ** 2 + taps[:, None] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = _gaussian_taps(5 if large else 3, max(alias_blur, 1e-3))
    r = g.numel() // 2
    padded = _filters.pad(disk, r, r, r, r, "mirror")
    smooth = torch.nn.functional.conv2d(padded[None, None], (g[:, None] * g[None, :])[None, None])[0, 0]
    return smooth.float()


def defocus_blur(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    """The release's disk convolution. Its disks of radius 8 and 10 (severities 4, 5) touch the
    edge of their grid, where the anti-aliasing blur reflects weight back in: those kernels sum to
    1.013 and 1.011, so flat regions brighten by about 1 %, as in the release."""
    radius, alias = DEFOCUS_BLUR[severity - 1]
    s = _base.size_scale(*x.shape[-2:])
    # the release draws disks of radius <= 8 on a 17x17 grid, larger ones on a (2 r + 1)^2 grid
    if s < 1:
        kernel = _filters.resample_kernel(disk_kernel(radius, alias, large=radius > 8, half=max(radius, 8)), s)
    else:
        half = math.ceil(max(radius, 8) * s)
        kernel = disk_kernel(radius * s, alias * s, large=radius > 8, half=half)
    kernel = kernel.to(x.device)
    return _filters.filter2d(x, kernel, mode="mirror").clamp(0, 1)


def glass_blur(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    """Gaussian blur, local pixel shuffling, Gaussian blur again, as the release.

    The shuffle is the release's own sequential loop (each pass visits the pixels from the
    bottom-right corner up; each takes the value of a random neighbour at (dy, dx), both uniform
    in [-delta, delta); the release's "swap" copies, see ``_filters.glass_shuffle``), computed
    exactly. From delta 2 on a value can be copied on several times in one pass, up and to the
    left, which a one-draw-per-pixel shuffle does not do: it would blur visibly less.
    Below one pixel of reach (images much smaller than 224 px) a pixel is swapped only with
    probability ``reach``, so that severities stay ordered.
    """
    sigma, delta, passes = GLASS_BLUR[severity - 1]
    n, c, h, w = x.shape
    s = _base.size_scale(h, w)
    reach = delta * s
    delta = max(1, round(reach))
    move_probability = min(reach, 1.0)
    x = _filters.quantize(_filters.gaussian_blur(x, sigma, scale=s))
    for _ in range(passes):
        offsets = utils.randint(2 * delta, (n, 2, h, w), generator, x.device) - delta
        if move_probability < 1.0:
            offsets *= (utils.rand((n, 1, h, w), generator, x.device) < move_probability).long()
        x = _filters.glass_shuffle(x, offsets, delta)
    return _filters.gaussian_blur(x, sigma, scale=s).clamp(0, 1)


def motion_blur(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    """ImageMagick's motion blur (``_filters.motion_blur``) at a random angle in [-45, 45) degrees,
    rounded to 8 bits as the release read it back from ImageMagick's PNG (lkfast.corrupt VERSION 6;
    before, the writer truncated it, half a level darker on average)."""
    radius, sigma = MOTION_BLUR[severity - 1]
    s = _base.size_scale(*x.shape[-2:])
    angles = utils.uniform((x.shape[0],), -45.0, 45.0, generator, x.device)
    return _filters.round8(_filters.motion_blur(x, radius, sigma, angles, scale=s))


def zoom_blur(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    zooms = ZOOM_BLUR[severity - 1]
    total = x.clone()
    for z in zooms:
        total += _filters.clipped_zoom(x, z)
    return (total / (len(zooms) + 1)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    return _filters.gaussian_blur(x, GAUSSIAN_BLUR[severity - 1], scale=_base.size_scale(*x.shape[-2:])).clamp(0, 1)

"""Private plumbing of lkfast.corrupt: the size scale and fast Poisson counts.

Everything here is a small pure function; the corruption families (noise, blur, weather,
digital) and the perturbation sequences build on it. The helpers other packages need (seeds,
random draws, input checks, centre crop) are public, in ``lkfast.corrupt.utils``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .utils import generator_device

REFERENCE_SIZE = 224  # every ImageNet-C / ImageNet-P parameter was chosen for 224x224 images


def size_scale(height: int, width: int) -> float:
    """How much larger than the 224-px release an image is (short side / 224).

    Spatial parameters of the release (blur radii and sigmas, displacement lengths, texture
    scales) are lengths in 224-px pixels; multiplying them by this factor gives the same
    corruption relative to the image content at any size. Pixel-wise parameters (noise levels,
    JPEG quality, colour shifts) do not depend on size.
    """
    return min(height, width) / REFERENCE_SIZE


def layer_grid(height: int, width: int, scale: Optional[float] = None) -> tuple:
    """(H, W, s) of the grid a texture layer (snow flakes, spatter drops) is drawn on for an image
    of this size whose lengths scale by ``scale`` (default ``size_scale``): the image's own where
    scale >= 1 (s = scale), else the grid 1 / scale times larger (224 px on the short side without
    a crop), s = 1. Such layers are thresholded noise: drawn on a smaller
    grid, their flakes and drops could not shrink below a pixel, and far more (4-6x at 64 px) of
    the image would be covered than in the release. Drawn at 224 px and box-averaged down
    (``_filters.pil_box_resize``), they are what the image's 224-px blow-up would get."""
    s = size_scale(height, width) if scale is None else scale
    if s >= 1:
        return height, width, s
    return max(round(height / s), 1), max(round(width / s), 1), 1.0


LEVELS = 255  # 8-bit images: x = k / 255


GUIDE = 256  # buckets of the uniform per level in the guide table


@functools.lru_cache(maxsize=16)
def _poisson_tables(rate: float, device: str) -> tuple:
    """Inverse-CDF tables of Poisson(rate * k / 255), k = 0..255: the CDF (256, J) flattened,
    J reaching where the CDF rounds to 1 in float64, and a guide table (256, GUIDE) flattened:
    guide[k, b] = the count the inverse CDF gives at u = b / GUIDE, where a search for any u in
    [b / GUIDE, (b + 1) / GUIDE) can start."""
    lam = rate * (torch.arange(LEVELS + 1, dtype=torch.float32) / LEVELS).double()  # float32 grid, as x holds it
    length = int(rate + 12 * math.sqrt(rate) + 30)
    j = torch.arange(length, dtype=torch.float64)
    log_pmf = j[None, :] * torch.log(lam[:, None].clamp_min(1e-300)) - lam[:, None] - torch.lgamma(j + 1)[None, :]
    pmf = torch.where(lam[:, None] > 0, torch.exp(log_pmf), (j[None, :] == 0).double())
    cdf = torch.cumsum(pmf, dim=1).clamp(max=1.0)
    cdf[:, -1] = 2.0  # the mass beyond J (below float64 resolution) goes to the last count
    starts = (torch.arange(GUIDE, dtype=torch.float64) / GUIDE).expand(LEVELS + 1, GUIDE).contiguous()
    guide = torch.searchsorted(cdf, starts, right=True)
    return cdf.flatten().to(device), guide.flatten().to(device), length


def poisson_counts(x: torch.Tensor, rate: float, generator) -> torch.Tensor:
    """Poisson(rate * x) counts (float tensor like x) for x in [0, 1], same distribution as
    ``torch.poisson(rate * x)`` but much faster on 8-bit images.

    rate * x is split as rate * g + rate * (x - g), g = k / 255 the 8-bit level at or below x;
    Poisson(a + b) is the sum of independent Poisson(a) and Poisson(b). The first part is drawn
    by inverse CDF from a table per level (one float64 uniform per value; a guide table gives
    the count at the start of the uniform's bucket, a few vectorised steps finish the search),
    the second, zero for 8-bit images, by torch.poisson where it is not zero. Exact up to the
    float64 rounding of the CDF (~1e-14 per outcome)."""
    device = x.device
    gen_device = generator_device(generator, device)
    xf = x.to(gen_device, torch.float32)
    level = torch.round(xf * LEVELS)
    remainder = None
    if not torch.equal(level / LEVELS, xf):  # not all 8-bit: take the level at or below x
        level.clamp_(0, LEVELS)
        level -= (level / LEVELS > xf).to(level.dtype)
        remainder = xf - level / LEVELS
    u = torch.rand(x.shape, generator=generator, device=gen_device, dtype=torch.float64).flatten()
    cdf, guide, length = _poisson_tables(float(rate), str(gen_device))
    level = level.flatten()
    rows = level.long()
    counts = guide[(u * GUIDE).long().add_(rows, alpha=GUIDE)]  # u * GUIDE < GUIDE exactly
    rows.mul_(length)
    # the guide's count is right unless the uniform's bucket holds further CDF steps (a few %)
    active = (u >= cdf[rows + counts]).nonzero().flatten()
    while active.numel():
        counts[active] += 1
        active = active[u[active] >= cdf[rows[active] + counts[active]]]
    counts = counts.view(x.shape).to(torch.float32)
    if remainder is not None and bool((remainder > 0).any()):
        counts += torch.poisson(remainder * rate, generator=generator)
    return counts.to(device, x.dtype)


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))

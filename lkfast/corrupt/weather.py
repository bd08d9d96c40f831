"""Weather corruptions: snow, frost, fog, brightness, spatter.

Parameters per severity 1..5 are those of the ImageNet-C release (Hendrycks & Dietterich, ICLR
2019, make_imagenet_c.py). Lengths (snow-flake zoom, motion-blur radius and sigma, spatter blur
sigmas and distance cut-off, the fog fractal's size, the frost photograph's scale) are in 224-px
pixels and are multiplied by ``size_scale`` = min(H, W) / 224; blend weights are not. Below
224 px snow's flakes and spatter's drops are drawn on the 224-px grid and box-averaged to the
image (``_base.layer_grid``): thresholded noise drawn on a smaller grid cannot make features
smaller than a pixel, and covered 1.6x (snow) to 11x (spatter) more of a 64-px image. Above 224 px
spatter's noise is scaled so that its blurred spread, which the threshold cuts, stays the release's.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _base, _filters, utils

# mean, std of the flake noise, zoom, threshold, motion radius, motion sigma, image weight
SNOW = ((0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))     # image weight, frost weight
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))          # fog strength, fractal decay
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)                                    # added to HSV value
# mean, std of the liquid noise, its blur sigma, threshold, (water) intensity or (mud) sigma, mud?
SPATTER = ((0.65, 0.3, 4, 0.69, 0.6, 0),
           (0.65, 0.3, 3, 0.68, 0.6, 0),
           (0.65, 0.3, 2, 0.68, 0.5, 0),
           (0.65, 0.3, 1, 0.65, 1.5, 1),
           (0.67, 0.4, 1, 0.65, 1.5, 1))
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_USED = 5  # the release draws np.random.randint(5): frost6.jpg is listed but never used
WATER_COLOUR = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise
MUD_COLOUR = (63 / 255, 42 / 255, 20 / 255)       # mud brown


class FrostPhotosMissing(RuntimeError):
    """The release's frost photographs, which frost blends in, are not here (the message says
    what to install or set)."""


# ----------------------------------------------------------------------------------------- snow
def snow(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    mean, std, zoom, threshold, radius, sigma, keep = SNOW[severity - 1]
    n, _, h, w = x.shape
    gh, gw, s = _base.layer_grid(h, w)  # below 224 px the flakes are drawn at 224 px, then averaged down
    layer = mean + std * utils.randn((n, 1, gh, gw), generator, x.device)
    layer = _filters.clipped_zoom(layer, max(zoom * s, 1.0))
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = _filters.quantize(layer)  # the release stores the flakes as an 8-bit PNG for ImageMagick
    angles = utils.uniform((n,), -135.0, -45.0, generator, x.device)
    # ImageMagick blurs it and hands back an 8-bit PNG: rounded (np.uint8 above truncates)
    layer = _filters.round8(_filters.motion_blur(layer, radius, sigma, angles, scale=s))
    layer = _filters.pil_box_resize(layer, h, w)  # back to the image's grid (nothing to do at 224 px and up)
    x = keep * x + (1 - keep) * torch.maximum(x, _filters.rgb_to_gray(x) * 1.5 + 0.5)
    return (x + layer + torch.flip(layer, dims=(-2, -1))).clamp(0, 1)


# ---------------------------------------------------------------------------------------- frost
def frost_directory() -> Path:
    """Where the release's frost photographs are: $LKFAST_FROST_DIR, else the copy shipped by the
    `imagecorruptions` package (pip install imagecorruptions-imaug)."""
    override = os.environ.get("LKFAST_FROST_DIR")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec("imagecorruptions")
        if spec is None or not spec.submodule_search_locations:
            raise FrostPhotosMissing(
                "frost needs the ImageNet-C frost photographs, which ship with the imagecorruptions "
                "package: pip install imagecorruptions-imaug (or set LKFAST_FROST_DIR to a folder "
                f"holding {', '.join(FROST_FILES[:FROST_USED])})")
        path = Path(list(spec.submodule_search_locations)[0]) / "frost"
    missing = [f for f in FROST_FILES[:FROST_USED] if not (path / f).is_file()]
    if missing:
        raise FrostPhotosMissing(f"frost photographs missing in {path}: {', '.join(missing)}")
    return path


@functools.lru_cache(maxsize=None)
def _frost_photos_cpu() -> tuple:
    from PIL import Image  # Pillow comes with torchvision

    folder = frost_directory()
    photos = []
    for name in FROST_FILES[:FROST_USED]:
        with Image.open(folder / name) as im:
            rgb = im.convert("RGB")  # cv2.imread(IMREAD_COLOR) also drops the alpha channel
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            photos.append(data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255)
    return tuple(photos)


@functools.lru_cache(maxsize=32)
def _frost_photo(index: int, height: int, width: int, device: str) -> torch.Tensor:
    photo = _frost_photos_cpu()[index]
    s = _base.size_scale(height, width)
    ph, pw = photo.shape[-2:]
    # scale like the image, then enlarge if the photograph would not cover it (the release
    # crops with randint(0, photo - 224), so it needs at least one spare pixel each way)
    factor = max(s, (height + 1) / ph, (width + 1) / pw)
    if abs(factor - 1) > 1e-6:
        size = (max(math.ceil(ph * factor), height + 1), max(math.ceil(pw * factor), width + 1))
        photo = F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        photo = photo.clamp(0, 1)
    return photo.to(device)


def frost(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    keep, amount = FROST[severity - 1]
    n, _, h, w = x.shape
    which = utils.randint(FROST_USED, (n,), generator, torch.device("cpu"))
    u = utils.rand((n, 2), generator, torch.device("cpu"))
    layer = torch.empty_like(x)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    for index in range(FROST_USED):  # a loop over the five photographs, not over images
        chosen = (which == index).nonzero().flatten()
        if chosen.numel() == 0:
            continue
        photo = _frost_photo(index, h, w, str(x.device))
        ph, pw = photo.shape[-2:]
        top = (u[chosen, 0] * (ph - h)).long().to(x.device)
        left = (u[chosen, 1] * (pw - w)).long().to(x.device)
        r = (top[:, None] + rows[None, :])[:, :, None]
        c = (left[:, None] + cols[None, :])[:, None, :]
        layer[chosen.to(x.device)] = photo[:, r, c].permute(1, 0, 2, 3)
    return (keep * x + amount * layer).clamp(0, 1)


# ------------------------------------------------------------------------------------------ fog
def plasma_fractal(n: int, mapsize: int, decay: float, generator, device) -> torch.Tensor:
    """(n, mapsize, mapsize) diamond-square height maps in [0, 1], all n built at once (the release's
    plasma_fractal, after github.com/FLHerne/mapgen, with a batch dimension)."""
    assert mapsize & (mapsize - 1) == 0, "mapsize must be a power of two"
    heights = torch.zeros(n, mapsize, mapsize, device=device)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(total):
        return total / 4 + wibble * utils.uniform(total.shape, -wibble, wibble, generator, device)

    while step >= 2:
        half = step // 2
        corners = heights[:, 0::step, 0::step]
        squares = corners + torch.roll(corners, -1, dims=1)
        squares = squares + torch.roll(squares, -1, dims=2)
        heights[:, half::step, half::step] = wibbled_mean(squares)
        centres = heights[:, half::step, half::step]
        corners = heights[:, 0::step, 0::step]
        left = centres + torch.roll(centres, 1, dims=1) + corners + torch.roll(corners, -1, dims=2)
        heights[:, 0::step, half::step] = wibbled_mean(left)
        top = centres + torch.roll(centres, 1, dims=2) + corners + torch.roll(corners, -1, dims=1)
        heights[:, half::step, 0::step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    low = heights.amin(dim=(1, 2), keepdim=True)
    heights = heights - low
    return heights / heights.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def fog(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    strength, decay = FOG[severity - 1]
    n, _, h, w = x.shape
    s = _base.size_scale(h, w)
    # the release draws a 256-px map for 224-px images and keeps its top-left corner; at other
    # sizes draw at least that fine and resample to 256 * s, so the fog's texture scales too
    length = max(math.ceil(256 * s), h, w)
    mapsize = max(256, _base.next_power_of_two(length))
    heights = plasma_fractal(n, mapsize, decay, generator, x.device)[:, None]
    if mapsize != length:
        heights = F.interpolate(heights, size=(length, length), mode="bilinear", antialias=True,
                                align_corners=False)
    heights = heights[..., :h, :w]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + strength * heights) * peak / (peak + strength)).clamp(0, 1)


# ----------------------------------------------------------------------------------- brightness
def brightness(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    return _filters.adjust_value(x, BRIGHTNESS[severity - 1])


# -------------------------------------------------------------------------------------- spatter
def liquid_layer(n: int, height: int, width: int, mean: float, std: float, sigma: float, threshold: float,
                 generator, device, scale=None) -> tuple:
    """The release's liquid layer for n images of this size: N(mean, std^2) noise blurred by ``sigma``
    (224-px pixels), zero below ``threshold``; (layer (n, 1, H', W'), s) on ``_base.layer_grid``'s
    grid and scale (below 224 px the drops are drawn at 224 px, then averaged down)."""
    gh, gw, s = _base.layer_grid(height, width, scale)
    # The liquid layer is white noise blurred by sigma: its spread (std times the blur's 2-D L2 norm)
    # is what the fixed threshold cuts, so above 224 px the noise is scaled by the release's norm over
    # this size's, to keep the release's share of wet pixels (1 at 224 px and below)
    gain = (_filters.gaussian_kernel(sigma).norm() / _filters.gaussian_kernel(sigma, scale=s).norm()).item() ** 2
    liquid = mean + std * gain * utils.randn((n, 1, gh, gw), generator, device)
    liquid = _filters.gaussian_blur(liquid, sigma, scale=s)
    return torch.where(liquid < threshold, torch.zeros_like(liquid), liquid), s


def water_drops(liquid: torch.Tensor, intensity: float, scale: float, height: int, width: int) -> torch.Tensor:
    """The release's water mask of (N, 1, H', W') liquid layers (``liquid_layer``'s grid and scale):
    drops whose rims are shaded by the distance to the drop edges (its OpenCV pipeline: Canny,
    distance transform, equalised histogram, emboss), peak ``intensity``, box-averaged to
    (N, 1, height, width). ``wet`` adds it to images."""
    liquid8 = torch.floor(liquid.clamp(0, 1) * 255)
    edges = _filters.canny(liquid8, 50, 150)
    dist = _filters.distance_to_mask(edges, 20 * scale)
    dist = torch.floor(_filters.box3(dist))
    dist = _filters.equalize_hist(dist)
    # cv2.filter2D with the emboss kernel [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]] (reflect-101
    # border): integer sums, exact in any order
    p = F.pad(dist, (1, 1, 1, 1), mode="reflect")
    h1, w1 = dist.shape[-2:]

    def tap(dy, dx):
        return p[..., dy:dy + h1, dx:dx + w1]

    emboss = tap(1, 1) + tap(1, 2) + tap(2, 1) - tap(0, 1) - tap(1, 0) + 2 * (tap(2, 2) - tap(0, 0))
    dist = torch.round(emboss).clamp_(0, 255)
    dist = torch.round(_filters.box3(dist))
    m = liquid8 * dist
    return _filters.pil_box_resize(m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) * intensity, height, width)


def wet(x: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, H, W) with ``water_drops``' mask (..., 1, H, W) added in pale turquoise."""
    colour = torch.tensor(WATER_COLOUR, device=x.device).view(3, 1, 1)
    return (x + drops * colour).clamp(0, 1)


def spatter(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    mean, std, sigma, threshold, intensity, mud = SPATTER[severity - 1]
    n, _, h, w = x.shape
    liquid, s = liquid_layer(n, h, w, mean, std, sigma, threshold, generator, x.device)
    if mud:
        m = _filters.gaussian_blur((liquid > threshold).float(), intensity, scale=s)
        m = _filters.pil_box_resize(torch.where(m < 0.8, torch.zeros_like(m), m), h, w)
        colour = torch.tensor(MUD_COLOUR, device=x.device).view(1, 3, 1, 1)
        return (x * (1 - m) + colour * m).clamp(0, 1)
    return wet(x, water_drops(liquid, intensity, s, h, w))

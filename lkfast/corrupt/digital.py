"""Digital corruptions: contrast, elastic_transform, pixelate, jpeg_compression, saturate.

Parameters per severity 1..5 are those of the ImageNet-C release (Hendrycks & Dietterich, ICLR
2019, make_imagenet_c.py). Only elastic_transform has lengths; pixelate's factor and JPEG's
quality are relative to the image already.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import _base, _filters, utils

CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)            # factor towards the per-channel mean
# The release writes these as multiples of 244 ("should have been 224, but ultimately nothing is
# incorrect"): displacement scale alpha, smoothing sigma, affine corner jitter, in 224-px pixels.
ELASTIC = ((244 * 2, 244 * 0.7, 244 * 0.1),
           (244 * 2, 244 * 0.08, 244 * 0.2),
           (244 * 0.05, 244 * 0.01, 244 * 0.02),
           (244 * 0.07, 244 * 0.01, 244 * 0.02),
           (244 * 0.12, 244 * 0.01, 244 * 0.02))
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)            # box-downsample factor
JPEG_QUALITY = (25, 18, 15, 10, 7)
SATURATE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))  # HSV saturation * a + b


def contrast(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    c = CONTRAST[severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * c + means).clamp(0, 1)


def _affine_jitter(n: int, h: int, w: int, jitter: float, generator, device) -> torch.Tensor:
    """(n, 2, 3) inverse affine maps (output (x, y) -> input (x, y)) of the release's random
    affine: three points around the centre moved by U(-jitter, jitter), cv2.getAffineTransform."""
    cx, cy = float(w // 2), float(h // 2)
    d = float(min(h, w) // 3)
    src = torch.tensor([[cx + d, cy + d], [cx + d, cy - d], [cx - d, cy - d]], device=device)
    dst = src + utils.uniform((n, 3, 2), -jitter, jitter, generator, device)
    ones = torch.ones(3, 1, device=device)
    # forward map A with [x', y'] = A [x, y, 1]: solve [src 1] A^T = dst
    forward = torch.linalg.solve(torch.cat([src, ones], 1).expand(n, 3, 3), dst).transpose(1, 2)
    linear, shift = forward[:, :, :2], forward[:, :, 2:]
    inv_linear = torch.linalg.inv(linear)
    return torch.cat([inv_linear, -inv_linear @ shift], dim=2)


def elastic_transform(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    """The release's elastic transform: a random affine warp (reflect-101 border), then a smooth
    random displacement field (uniform noise, Gaussian-smoothed with scipy's 'reflect' mode and
    truncate=3, times alpha), both bilinear.

    Two bilinear lookups, as the release (cv2.warpAffine, then map_coordinates): each blurs, and
    composed into one (lkfast before VERSION 5) the result was 11-13% sharper than the release's
    (mean horizontal gradient, a corruption audit). Difference, documented: mirror reflection
    (reflect-101) at the border for both lookups (the second is scipy's half-sample 'reflect' in the
    release: the border pixels only). Size scaling: sigma and
    the affine jitter scale with s = min(H, W) / 224; alpha scales with s^2, because smoothing
    white noise with a sigma s times wider shrinks it by 1/s, and the displacement must grow
    by s to stay the same fraction of the image.
    """
    alpha, sigma, jitter = ELASTIC[severity - 1]
    n, _, h, w = x.shape
    s = _base.size_scale(h, w)
    alpha, sigma, jitter = alpha * s * s, sigma * s, jitter * s
    inverse = _affine_jitter(n, h, w, jitter, generator, x.device)
    noise = utils.uniform((n, 2, h, w), -1.0, 1.0, generator, x.device)
    shift = _filters.gaussian_blur(noise, sigma, truncate=3.0, mode="reflect") * alpha
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32),
                            torch.arange(w, device=x.device, dtype=torch.float32), indexing="ij")

    def lookup(image, sx, sy):  # bilinear at pixel coordinates (sx, sy), reflect-101 outside
        grid = torch.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], dim=-1)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=True)

    sx = inverse[:, 0, 0, None, None] * xs + inverse[:, 0, 1, None, None] * ys + inverse[:, 0, 2, None, None]
    sy = inverse[:, 1, 0, None, None] * xs + inverse[:, 1, 1, None, None] * ys + inverse[:, 1, 2, None, None]
    warped = lookup(x, sx, sy)  # the affine warp, resampled (cv2.warpAffine)
    # then the displacement field samples the warped image (map_coordinates, order 1)
    return lookup(warped, xs + shift[:, 0], ys + shift[:, 1]).clamp(0, 1)


def pixelate(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    """Pillow's box resize down by the factor and back up, on the 8-bit image, as the release: on the
    CPU Pillow itself, over a few threads; elsewhere ``_filters.pil_box_resize_8bit``, the same bytes
    (before lkfast.corrupt VERSION 6: the unrounded averages, which the writer's truncation put a
    level lower on most pixels)."""
    c = PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    small = (max(int(w * c), 1), max(int(h * c), 1))
    if x.device.type == "cpu":
        from PIL import Image

        pixels = _filters.rounded_levels(x).to(torch.uint8)
        out = _per_image_pillow(pixels, lambda image: image.resize(small, Image.BOX).resize((w, h), Image.BOX))
        return out.to(x.dtype) / 255
    return _filters.pil_box_resize_8bit(_filters.pil_box_resize_8bit(x, small[1], small[0]), h, w)


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode each image as a JPEG at ``quality`` (4:2:0 chroma, Pillow's default, as the release
    saved them) and decode it again, with the release's own codec, Pillow, over a few threads
    (Pillow releases the GIL while coding), on every device: a GPU's images go through the CPU and
    back. (torchvision's nvJPEG encoder writes 4:4:4 chroma, a milder corruption, and gives its
    JPEGs back on the GPU, where torchvision 0.29's decoder refuses them with a ValueError.)"""
    pixels = _filters.rounded_levels(x).to(torch.uint8)
    return _pillow_roundtrip(pixels.cpu(), quality).to(x.device, x.dtype) / 255


def _pillow_roundtrip(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    from PIL import Image

    def roundtrip(image):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")

    return _per_image_pillow(pixels, roundtrip)


def _per_image_pillow(pixels: torch.Tensor, function) -> torch.Tensor:
    """(N, 3, H, W) uint8 CPU images through ``function`` (a PIL RGB image -> one of the same size), each
    image as the release's PIL image, over a few threads (Pillow releases the GIL while it works)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    n, c, h, w = pixels.shape
    hwc = pixels.permute(0, 2, 3, 1).contiguous()
    out = torch.empty_like(hwc)

    def one(i):
        out[i].numpy()[...] = np.asarray(function(Image.frombuffer("RGB", (w, h), hwc[i].numpy(), "raw", "RGB", 0, 1)))

    workers = min(n, max(1, torch.get_num_threads()))
    if workers == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(n)))
    return out.permute(0, 3, 1, 2)


def jpeg_compression(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    return jpeg_roundtrip(x, JPEG_QUALITY[severity - 1])


def saturate(x: torch.Tensor, severity: int, generator=None) -> torch.Tensor:
    """HSV saturation S -> clip(S * a + b, 0, 1), hue and value kept (skimage rgb2hsv/hsv2rgb).

    With V = max and m = min of a pixel, every channel is V - S * V * k(hue), so the new channel
    is V - (S'/S)(V - channel). Grey pixels have hue 0 by skimage's convention: they become
    (V, V(1 - S'), V(1 - S')), a red tint, when b > 0.
    """
    a, b = SATURATE[severity - 1]
    value = x.amax(dim=1, keepdim=True)
    low = x.amin(dim=1, keepdim=True)
    chroma = value - low
    sat = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    new_sat = (sat * a + b).clamp(0, 1)
    coloured = value - (new_sat / sat.clamp_min(1e-12)) * (value - x)
    grey_hue0 = torch.tensor([0.0, 1.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    grey = value * (1 - new_sat * grey_hue0)
    return torch.where(chroma > 0, coloured, grey).clamp(0, 1)

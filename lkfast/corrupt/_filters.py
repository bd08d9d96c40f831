"""Batched image filters the corruptions share, written to match the libraries the release used.

- ``gaussian_blur``: scikit-image / scipy.ndimage ``gaussian_filter`` (same kernel radius rule
  ``int(truncate * sigma + 0.5)`` and the same boundary modes), as two small matrix products:
  exact for any sigma, even sigmas larger than the image (elastic transform uses ~170 px).
- ``splat_matrix`` / ``resample_kernel``: a kernel drawn at 224 px carried to a smaller image.
- ``filter2d``: OpenCV ``filter2D`` (correlation, BORDER_REFLECT_101 or replicate), via FFT so
  that large and per-image kernels (defocus disks, motion-blur lines) cost the same as small ones.
- ``motion_blur``: ImageMagick ``MotionBlurImage`` (the release called it through Wand).
- ``clipped_zoom``: the release's ``scipy.ndimage.zoom(order=1)`` of the centre crop.
- ``pil_box_resize``: Pillow's ``Image.resize(..., Image.BOX)``, as resampling matrices (on float
  layers); ``pil_box_resize_8bit`` the same on an 8-bit image, rounding as Pillow does.
- ``adjust_value``: scikit-image's rgb2hsv -> value + shift -> hsv2rgb, as a rescale.
- ``canny``, ``distance_to_mask``, ``equalize_hist``, ``box3``, ``dilate3``: OpenCV's ``Canny``,
  ``distanceTransform`` (its 5x5 chamfer distance, capped), ``equalizeHist``, ``blur`` 3x3 and ``dilate``
  3x3, the pieces of the release's water-spatter pipeline.
- ``glass_shuffle``: the release's sequential glass-blur pixel loop, exactly, in parallel waves.
All take (..., H, W) float tensors (masks: bool) and run on whatever device the tensor is on
(``distance_to_mask`` hands CPU masks to OpenCV itself where it is installed).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import utils


def boundary_index(index: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map out-of-range indices into 0..n-1.

    modes: "nearest" (a a a | a b c | c c c), "reflect" (scipy's half-sample symmetric,
    b a | a b c | c b), "mirror" (OpenCV's REFLECT_101 / scipy mirror, c b | a b c | b a).
    """
    if mode == "nearest":
        return index.clamp(0, n - 1)
    if mode == "reflect":
        index = index % (2 * n)
        return torch.where(index >= n, 2 * n - 1 - index, index)
    if mode == "mirror":
        if n == 1:
            return torch.zeros_like(index)
        period = 2 * n - 2
        index = index % period
        return torch.where(index >= n, period - index, index)
    raise ValueError(f"unknown boundary mode {mode!r}")


def pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    """Pad the last two dims with any boundary_index mode, for any pad width (F.pad's reflect
    refuses pads wider than the image)."""
    h, w = x.shape[-2:]
    rows = boundary_index(torch.arange(-top, h + bottom, device=x.device), h, mode)
    cols = boundary_index(torch.arange(-left, w + right, device=x.device), w, mode)
    return x.index_select(-2, rows).index_select(-1, cols)


def gaussian_taps(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's normalised Gaussian taps (float64, radius ``int(truncate * sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    return weights / weights.sum()


def lanczos3(t: torch.Tensor) -> torch.Tensor:
    """The Lanczos-3 kernel sinc(t) sinc(t / 3) on |t| < 3 (float64; exactly 1 at 0 and 0 at the
    other integers)."""
    t = t.abs()
    integer = (t - t.round()).abs() < 1e-12
    safe = torch.where(integer, torch.ones_like(t), t)
    value = 3 * torch.sin(math.pi * safe) * torch.sin(math.pi * safe / 3) / (math.pi * math.pi * safe * safe)
    value = torch.where(integer, (t.round() == 0).to(t.dtype), value)
    return torch.where(t < 3, value, torch.zeros_like(t))


def splat_matrix(taps: int, scale: float) -> torch.Tensor:
    """(2 r + 1, taps) float64 matrix A, r = ceil((taps - 1) / 2 * scale) + 2 (Lanczos' reach; + 0
    at scale 1), that carries an odd kernel drawn in 224-px pixels to an image ``scale`` (< 1)
    times that size: tap p (centred offset) lands at p * scale and is spread over the nearby
    pixels by Lanczos-3 interpolation weights (a windowed sinc), normalised so that each tap
    keeps its weight. The carried kernel then has the release kernel's frequency response at
    every frequency the smaller image holds (to about 1 %: tests/test_corrupt.py), so a corruption
    keeps its strength relative to the content however small the image. A kernel drawn at the
    scaled length instead degenerates below a pixel (at 64 px the release's severity-1 defocus
    disk and Gaussian blurred nothing), and linear spreading would blur about 20 % more at a
    quarter of the sampling rate. At scale 1 A is the identity."""
    half = (taps - 1) // 2
    r = math.ceil(half * scale - 1e-9) + (2 if scale < 1 else 0)
    j = torch.arange(-r, r + 1, dtype=torch.float64)[:, None]
    p = torch.arange(-half, half + 1, dtype=torch.float64)[None, :]
    a = lanczos3(j - p * scale)
    return a / a.sum(0, keepdim=True)


def resample_kernel(kernel: torch.Tensor, scale: float) -> torch.Tensor:
    """A 1-D or square 2-D odd kernel drawn in 224-px pixels, carried to ``scale`` < 1 by
    ``splat_matrix`` along each axis (same dtype; the sum is kept)."""
    a = splat_matrix(kernel.shape[-1], scale)
    k = kernel.double()
    out = a @ k if k.dim() == 1 else a @ k @ a.T
    return out.to(kernel.dtype)


def gaussian_kernel(sigma: float, truncate: float = 4.0, scale: float = 1.0) -> torch.Tensor:
    """The 1-D taps (float64) ``gaussian_blur(x, sigma, truncate, scale=scale)`` applies along each axis."""
    if scale < 1:
        return resample_kernel(gaussian_taps(sigma, truncate), scale)
    return gaussian_taps(sigma * scale, truncate)


@functools.lru_cache(maxsize=128)
def _gaussian_matrix_cpu(n: int, sigma: float, truncate: float, mode: str, scale: float,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    weights = gaussian_kernel(sigma, truncate, scale)
    radius = weights.numel() // 2
    rows = torch.arange(n)[:, None]
    cols = boundary_index(rows + torch.arange(-radius, radius + 1)[None, :], n, mode)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.scatter_add_(1, cols, weights.expand(n, -1).contiguous())
    return matrix.to(dtype)


def gaussian_matrix(n: int, sigma: float, device, truncate: float = 4.0, mode: str = "nearest",
                    scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) matrix M with (M @ signal) = scipy.ndimage.gaussian_filter1d(signal, sigma * scale, mode,
    truncate) for scale >= 1; below, the taps of ``sigma`` carried to ``scale`` (``splat_matrix``)."""
    return _gaussian_matrix_cpu(int(n), float(sigma), float(truncate), mode, float(scale), dtype).to(device)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "nearest",
                  scale: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of the last two dims (skimage.filters.gaussian defaults). ``sigma``
    is in pixels of a reference size that the image is ``scale`` times (a release length at 224 px,
    with ``scale`` = ``_base.size_scale``): sampled at sigma * scale where scale >= 1, the reference
    taps carried by ``splat_matrix`` below. Computed in x's dtype (float64 taps for a float64 x)."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    rows = gaussian_matrix(h, sigma, x.device, truncate, mode, scale, x.dtype)
    cols = gaussian_matrix(w, sigma, x.device, truncate, mode, scale, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def fft_size(n: int) -> int:
    """The smallest 5-smooth length >= n (2^a 3^b 5^c), which FFTs handle fastest."""
    size = n
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


def pad_edges(x: torch.Tensor, r: int, mode: str) -> torch.Tensor:
    """``pad`` by r on all four sides; one F.pad call where torch's modes can do it."""
    h, w = x.shape[-2:]
    if x.dim() == 4 and (mode == "nearest" or (mode == "mirror" and r < min(h, w))):
        return F.pad(x, (r, r, r, r), mode="replicate" if mode == "nearest" else "reflect")
    return pad(x, r, r, r, r, mode)


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "mirror") -> torch.Tensor:
    """Correlate (N, C, H, W) images with an odd (K, K) kernel, or one kernel per image (N, 1, K, K),
    like cv2.filter2D. Computed with real FFTs on the padded images (no wrap-around: the pad is
    at least the kernel radius, and the transform length at least the padded size, rounded up
    to a fast length)."""
    k = kernel.shape[-1]
    assert k % 2 == 1 and kernel.shape[-2] == k
    r = k // 2
    h, w = x.shape[-2:]
    padded = pad_edges(x, r, mode)
    size = (fft_size(h + 2 * r), fft_size(w + 2 * r))
    spectrum = torch.fft.rfft2(padded, s=size)
    spectrum *= _kernel_spectrum(kernel.to(x.dtype), size)
    full = torch.fft.irfft2(spectrum, s=size)
    return full[..., k - 1:k - 1 + h, k - 1:k - 1 + w]


def _kernel_spectrum(kernel: torch.Tensor, size: tuple) -> torch.Tensor:
    return torch.fft.rfft2(torch.flip(kernel, dims=(-2, -1)), s=size)


def motion_kernels(radius: float, sigma: float, angles_deg: torch.Tensor) -> torch.Tensor:
    """One (K, K) line kernel per angle, as ImageMagick's MotionBlurImage builds it.

    ImageMagick takes width = 2*ceil(radius)+1 samples along the direction of ``angle``, at
    integer offsets ceil(i*cos(a) - 0.5), ceil(i*sin(a) - 0.5) for i = 0..width-1, weighted by a
    one-sided Gaussian exp(-i^2 / (2 sigma^2)) (normalised); pixels beyond the border repeat the
    edge ("edge" virtual pixels). The kernel here places exactly those weights, so with replicate
    padding the result is ImageMagick's up to float rounding: what differs is only that
    ImageMagick works on 16-bit quanta and the release then stored 8-bit PNGs.
    """
    width = int(2 * math.ceil(radius) + 1) if radius > 0 else 1
    sigma = max(float(sigma), 1e-6)
    i = torch.arange(width, dtype=torch.float64, device=angles_deg.device)
    weights = torch.exp(-(i * i) / (2 * sigma * sigma))
    weights = (weights / weights.sum()).float()
    a = torch.deg2rad(angles_deg.double())[:, None]
    dx = torch.ceil(i[None, :] * torch.cos(a) - 0.5).long()
    dy = torch.ceil(i[None, :] * torch.sin(a) - 0.5).long()
    size = 2 * (width - 1) + 1
    c = width - 1
    kernels = torch.zeros(angles_deg.shape[0], size * size, device=angles_deg.device)
    flat = (dy + c) * size + (dx + c)
    kernels.scatter_add_(1, flat, weights.expand_as(flat).contiguous())
    return kernels.view(-1, 1, size, size)


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angles_deg: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
    """ImageMagick-style motion blur of (N, C, H, W) with one angle per image (see motion_kernels).
    ``radius`` and ``sigma`` are in pixels of a reference size that the image is ``scale`` times:
    drawn at radius * scale, sigma * scale where scale >= 1, drawn at the reference size and carried
    by ``splat_matrix`` below."""
    if scale >= 1:
        return filter2d(x, motion_kernels(radius * scale, sigma * scale, angles_deg), mode="nearest")
    kernels = motion_kernels(radius, sigma, angles_deg)
    a = splat_matrix(kernels.shape[-1], scale).to(device=kernels.device, dtype=kernels.dtype)
    return filter2d(x, a @ kernels @ a.T, mode="nearest")


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom (N, C, H, W) by ``zoom`` >= 1 about the centre, keeping the size (the release's
    clipped_zoom: bilinear scipy.ndimage.zoom of the ceil(H / zoom) centre crop, centre-trimmed)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    oh, ow = max(round(ch * zoom), h), max(round(cw * zoom), w)
    # scipy's zoom (grid_mode=False) maps the corner pixels onto each other: align_corners=True.
    up = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return up[..., th:th + h, tw:tw + w]


@functools.lru_cache(maxsize=64)
def _pil_box_matrix64(n_in: int, n_out: int) -> torch.Tensor:
    # Pillow's ImagingResample with the box filter: support 0.5 * max(scale, 1), taps whose
    # (shifted) centres fall in (-0.5, 0.5] of the filter, normalised (in doubles, as Pillow's
    # precompute_coeffs).
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for out in range(n_out):
        center = (out + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        for j in range(xmin, xmax):
            t = (j - center + 0.5) / filterscale
            if -0.5 < t <= 0.5:
                matrix[out, j] = 1.0
        total = matrix[out].sum()
        if total > 0:
            matrix[out] /= total
    return matrix


@functools.lru_cache(maxsize=64)
def _pil_box_matrix_cpu(n_in: int, n_out: int) -> torch.Tensor:
    return _pil_box_matrix64(n_in, n_out).float()


_PIL_PRECISION_BITS = 22  # Pillow's 8-bit resampling: coefficients in 32 - 8 - 2 fixed-point bits


@functools.lru_cache(maxsize=64)
def _pil_box_taps(n_in: int, n_out: int):
    """Pillow's 8-bit box resampling of a line of ``n_in`` to ``n_out`` as (first, end, coefficient),
    each (n_out,): output j is the sum of inputs first[j]..end[j] - 1 times coefficient[j] (Pillow's
    fixed point, normalize_coeffs_8bpc: 1 / taps times 2^22, rounded half away from zero; a box
    gives each of a pixel's taps, which are consecutive, the same weight)."""
    scaled = _pil_box_matrix64(n_in, n_out) * (1 << _PIL_PRECISION_BITS)
    fixed = torch.trunc(scaled + torch.where(scaled < 0, -0.5, 0.5)).long()
    taps = fixed != 0
    first, count = taps.long().argmax(1), taps.sum(1)
    coefficient = fixed.gather(1, first[:, None])[:, 0]
    assert torch.equal(fixed[taps], coefficient.repeat_interleave(count)), "a box's taps weigh the same"
    return first, first + count, coefficient


def pil_box_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the last two dims like Pillow's Image.resize(..., Image.BOX); ``x`` itself where it
    already has that size (a layer drawn on the image's own grid, see ``_base.layer_grid``)."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    rows = _pil_box_matrix_cpu(h, height).to(x.device)
    cols = _pil_box_matrix_cpu(w, width).to(x.device)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def pil_box_resize_8bit(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's Image.resize(..., Image.BOX) of an 8-bit image, to the bit: ``x`` in [0, 1] is
    taken to 8 bits (rounded, as the PIL image the release resized), resampled horizontally, then
    vertically, each pass with Pillow's fixed-point coefficients (22 fractional bits), rounded half
    up and stored in 8 bits before the next, as ImagingResample does. Returns levels / 255.
    Exact integer arithmetic (window sums from running sums, times the taps' common weight), on any
    device."""
    h, w = x.shape[-2:]
    levels = rounded_levels(x).to(torch.int64)

    def resample(levels, dim, n_out):  # one pass along ``dim`` (-1: rows, -2: columns)
        first, end, coefficient = (t.to(x.device) for t in _pil_box_taps(levels.shape[dim], n_out))
        running = F.pad(levels.cumsum(dim), (1, 0) if dim == -1 else (0, 0, 1, 0))
        sums = running.index_select(dim, end) - running.index_select(dim, first)
        weight = coefficient if dim == -1 else coefficient[:, None]
        # (sum * weight + 2^21) >> 22, clipped to 0..255
        return ((sums * weight + (1 << (_PIL_PRECISION_BITS - 1))) >> _PIL_PRECISION_BITS).clamp_(0, 255)

    if w != width:
        levels = resample(levels, -1, width)
    if h != height:
        levels = resample(levels, -2, height)
    return levels.to(x.dtype) / 255


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) with OpenCV's RGB2GRAY weights (ITU-R BT.601)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round-trip through uint8 the way the release's np.uint8(x * 255) did (truncation,
    ``utils.levels8``)."""
    return utils.levels8(x) / 255


def rounded_levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the nearest 8-bit levels 0..255 (float): the PIL image the release made of a
    picture (the input pixelate and JPEG take), or what ImageMagick and OpenCV handed back."""
    return torch.round(x.clamp(0, 1) * 255)


def round8(x: torch.Tensor) -> torch.Tensor:
    """Round-trip through 8 bits to the nearest level: what the release got back from ImageMagick
    (motion blur, through an 8-bit PNG) and OpenCV (warpPerspective of a uint8 image), which round
    where numpy's np.uint8 truncates."""
    return rounded_levels(x) / 255


def adjust_value(x: torch.Tensor, shift) -> torch.Tensor:
    """Add ``shift`` to the HSV value channel, clipped to [0, 1], hue and saturation kept
    (skimage rgb2hsv -> v + shift -> hsv2rgb). Every channel is V times a function of (H, S), so
    this is a rescale by V'/V; black pixels (S = 0 by convention) become grey V'."""
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(0, 1)
    ratio = new_value / value.clamp_min(1e-12)
    return torch.where(value > 0, x * ratio, new_value.expand_as(x)).clamp(0, 1)


def box3_sum(x: torch.Tensor) -> torch.Tensor:
    """9 x the 3x3 box filter with OpenCV's default reflect-101 border (cv2.blur without the
    division), as two separable sums of slices."""
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    rows = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def box3(x: torch.Tensor) -> torch.Tensor:
    """cv2.blur(x, (3, 3)) with the default reflect-101 border."""
    return box3_sum(x) / 9


def dilate3(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary dilation of a bool mask, nothing outside the image (separable ors of slices;
    max_pool2d is several times slower on the CPU)."""
    rows = mask.clone()
    rows[..., 1:, :] |= mask[..., :-1, :]
    rows[..., :-1, :] |= mask[..., 1:, :]
    out = rows.clone()
    out[..., 1:] |= rows[..., :-1]
    out[..., :-1] |= rows[..., 1:]
    return out


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(image, low, high) for (N, 1, H, W) images holding 0..255 values: 3x3 Sobel
    (replicated border), L1 magnitude, non-maximum suppression in four directions, hysteresis
    with 8-connectivity. Returns a bool edge mask."""
    p = F.pad(image, (1, 1, 1, 1), mode="replicate")
    # separable 3x3 Sobel by slicing (cheaper than a convolution on one channel)
    smooth_rows = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    smooth_cols = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
    dx = smooth_rows[..., 2:] - smooth_rows[..., :-2]
    dy = smooth_cols[..., 2:, :] - smooth_cols[..., :-2, :]
    ax, ay = dx.abs(), dy.abs()
    mag = ax + ay
    m = F.pad(mag, (1, 1, 1, 1))  # OpenCV's magnitude buffer is zero outside the image

    def at(oy, ox):
        h, w = mag.shape[-2:]
        return m[..., 1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    tan22 = math.tan(math.radians(22.5))
    horizontal = ay < ax * tan22
    vertical = ay > ax * (tan22 + 2)  # tan 67.5 = tan 22.5 + 2
    s_pos = (dx * dy) >= 0
    diag = torch.where(s_pos, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1)))
    peak = torch.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                       torch.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), diag))
    candidate = peak & (mag > low)
    edges = candidate & (mag > high)
    if torch.equal(candidate, edges):  # no weak edges to connect
        return edges
    while True:
        grown = candidate & dilate3(edges)
        if torch.equal(grown, edges):
            return edges
        edges = grown


# OpenCV's 5x5 chamfer mask for DIST_L2 (distransform.cpp): a step, a diagonal step, a knight's move
_CHAMFER_5X5 = tuple([(dy, dx, 1.0) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
                     + [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
                     + [(dy, dx, 2.1969) for a, b in ((1, 2), (2, 1)) for dy in (-a, a) for dx in (-b, b)])


@functools.lru_cache(maxsize=None)
def _has_opencv() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def distance_to_mask(mask: torch.Tensor, limit: float, opencv: Optional[bool] = None) -> torch.Tensor:
    """Distance of every pixel to the nearest True pixel of (N, 1, H, W) ``mask``, capped at
    ``limit``: OpenCV's distanceTransform(DIST_L2, 5), the release's, followed by THRESH_TRUNC. That
    is the 5x5 chamfer distance, the lightest path of steps (1), diagonal steps (1.4) and knight's
    moves (2.1969), summed in float32 as OpenCV's raster passes sum them; it is up to 0.39 px from
    the Euclidean distance within 20 px (lkfast before lkfast.corrupt VERSION 8 took the Euclidean,
    and the release truncates these to 8 bits next).

    On the CPU, where OpenCV is installed (lkfast's imagecorruptions-imaug brings it), OpenCV
    itself, image by image (10-20x faster than the tensor code there on 248 224-px layers);
    elsewhere (``opencv=False``, a GPU) every step is relaxed at once until nothing below the cap
    changes (a path of weight <= limit has at most limit steps), within 2e-6 of OpenCV."""
    if opencv is None:
        opencv = mask.device.type == "cpu" and _has_opencv()
    if opencv:
        import cv2

        sources = np.where(mask[:, 0].cpu().numpy(), 0, 255).astype(np.uint8)  # distances to the zeros
        out = np.stack([cv2.distanceTransform(s, cv2.DIST_L2, 5) for s in sources])
        return torch.from_numpy(np.minimum(out, np.float32(limit)))[:, None].to(mask.device)
    n, _, h, w = mask.shape
    far = float(limit) + 8.0  # stands for "beyond the cap"; paths through it stay beyond
    dist = torch.where(mask, torch.zeros((), device=mask.device), torch.full((), far, device=mask.device)).float()
    candidate = torch.empty_like(dist)
    for _ in range(int(math.ceil(limit)) + 1):
        padded = F.pad(dist, (2, 2, 2, 2), value=far)
        relaxed = dist.clone()
        for dy, dx, weight in _CHAMFER_5X5:
            torch.add(padded[..., 2 + dy:2 + dy + h, 2 + dx:2 + dx + w], weight, out=candidate)
            torch.minimum(relaxed, candidate, out=relaxed)
        relaxed.clamp_(max=far)
        if torch.equal(relaxed, dist):
            break
        dist = relaxed
    return dist.clamp_(max=limit)


def equalize_hist(image: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist for (N, 1, H, W) integer-valued 0..255 images, each image on its own."""
    n = image.shape[0]
    flat = image.reshape(n, -1).long().clamp(0, 255)
    hist = torch.zeros(n, 256, device=image.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    cdf = hist.cumsum(1)
    first = (hist > 0).float().argmax(1, keepdim=True)
    first_count = hist.gather(1, first)
    total = float(flat.shape[1])
    scale = 255.0 / (total - first_count).clamp_min(1)
    lut = torch.round((cdf - first_count) * scale).clamp(0, 255)
    lut = torch.where(first_count == total, first.float().expand_as(lut), lut)
    return lut.gather(1, flat).view_as(image)


@functools.lru_cache(maxsize=16)
def _shuffle_schedule(height: int, width: int, delta: int, device: str = "cpu") -> tuple:
    """The positions the release's glass-blur loop visits, as flat pixel indices ordered by wave
    (see glass_shuffle), and the number of positions in each wave."""
    rows = torch.arange(height - delta, delta, -1)  # the release's range(H - delta, delta, -1)
    cols = torch.arange(width - delta, delta, -1)
    if rows.numel() == 0 or cols.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=device), ()
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    wave = (2 * delta * (height - delta - r) + (width - delta - c)).flatten()
    flat = (r * width + c).flatten()
    order = torch.argsort(wave, stable=True)
    counts = torch.bincount(wave)
    return flat[order].to(device), tuple(int(k) for k in counts if k > 0)


def glass_shuffle(x: torch.Tensor, offsets: torch.Tensor, delta: int) -> torch.Tensor:
    """The release's glass-blur pixel shuffle, exactly: for h from H - delta down to delta + 1,
    and within a row w from W - delta down to delta + 1, pixel (h, w) takes the current value of
    pixel (h + dy, w + dx).

    The release writes a swap, ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``, but on numpy rows
    (views) it copies: the second assignment reads the row the first has just overwritten, so
    (h', w') keeps its value and (h, w) gets a copy of it. Pixels are duplicated, not exchanged,
    and a value copied down-right-to-up-left can be copied on again later in the same pass.

    x: (N, C, H, W). offsets: (N, 2, H, W) integers, (dy, dx) per position, in [-delta, delta)
    (values at positions the loop does not visit are ignored). Returns a new tensor.

    The loop is sequential, but two of its steps touch disjoint pixels when their positions are
    2 delta or more apart in a row or a column. Position (h, w) runs at wave
    2 delta (H - delta - h) + (W - delta - w): any two steps that can touch a common pixel keep
    the release's order, and the steps of one wave are disjoint and run together, so the result
    is the sequential loop's, in about 2 delta H + W vectorised waves.
    """
    n, c, h, w = x.shape
    out = x.reshape(n, c, h * w).clone()
    positions, sizes = _shuffle_schedule(h, w, delta, str(x.device))
    flat_offsets = (offsets[:, 0] * w + offsets[:, 1]).reshape(n, h * w).to(torch.long)
    sources = (positions + flat_offsets[:, positions])[:, None, :].expand(n, c, -1)
    for here, there in zip(positions.split(sizes), sources.split(sizes, dim=2)):
        out[:, :, here] = out.gather(2, there)
    return out.view(n, c, h, w)

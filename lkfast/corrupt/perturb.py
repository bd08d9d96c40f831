"""ImageNet-P perturbation sequences on batched tensors.

Frame definitions follow the ImageNet-P release (Hendrycks & Dietterich, ICLR 2019,
github.com/hendrycks/robustness, ImageNet-P/create_p/make_imagenet_p.py), made for 224-px
centre crops of 256-px-resized images:

    gaussian_noise  31 frames, frame 0 clean, then x + N(0, s^2), s = 0.03 / 0.05 / 0.08 (difficulty 1/2/3)
    shot_noise      31 frames, frame 0 clean, then Poisson(x L) / L, L = 300 / 120 / 60
    motion_blur     31 frames, ImageMagick motion blur radius 10, sigma 3, angle (i - 30) * 4 degrees
    zoom_blur       31 frames, frame i = mean of zooms 1 + 0.004 j, j = 0..i (frame 0 clean)
    snow            31 frames, one flake layer per image, motion-blurred at angle 4 i - 150 (radius 14, sigma 4)
    brightness      31 frames, HSV value + (i - 15) * 0.02
    translate       41 frames, horizontal shift i - 20 px
    rotate          31 frames, rotation i - 15 degrees (torchvision's affine: the release's frame order)
    tilt            31 frames, perspective tilt of i - 15 degrees about both axes
    scale           31 frames, zoom (40 + 2.5 i) / 100

and the release's four validation perturbations (its "Validation Data", outside mFR and mT5D):

    speckle_noise   31 frames, frame 0 clean, then x + x N(0, s^2), s = 0.05 / 0.10 / 0.15 (difficulty 1/2/3)
    gaussian_blur   31 frames, Gaussian blur sigma 0.25 + 0.035 i (skimage, truncate 6)
    spatter         31 frames, one liquid layer per image (N(0.65, 0.27^2) blurred by sigma 3.7, zero below
                    0.69), ImageNet-C's water spatter (intensity 0.6) of it, the layer dripping down
                    after each frame (np.convolve of its columns with 0.05, 0.1, 0.15, 0.7)
    shear           31 frames, shear i - 15 degrees (torchvision 0.2's affine about the centre: x moves by
                    -sin(shear) y and y shrinks by cos(shear))

``difficulty`` selects the noise level for the three noise sequences (the release's
gaussian_noise, gaussian_noise_2, gaussian_noise_3 folders). For the other eleven the release has
one sequence per image and the difficulty (1..3) is the frame stride used when the flip rate is
computed, so the frames returned do not depend on it.

The geometric sequences (``GEOMETRIC``: zoom_blur, translate, rotate, tilt, scale, shear) move the whole
image about (w / 2, h / 2) and show what lies outside it as black, with the release's libraries'
border (Pillow's affine: the edge pixel repeated half a pixel out; OpenCV's tilt: blended with black);
the release moves the whole 256-px resize and keeps its central 224x224: pass that image and
``crop=224``, as the writer does (only the crop's pixels are computed). Lengths (shifts, blur radii, flake size,
spatter's blur and drip) scale with min(crop or image size) / 224; below 224 px the motion-blur and
Gaussian kernels are the 224-px ones carried to the smaller grid (see ``lkfast.corrupt.blur``) and
snow's flakes and spatter's drops are drawn at 224 px and averaged down (see ``lkfast.corrupt.weather``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _base, _filters, utils, weather

PERTURBATIONS: Dict[str, int] = {  # name -> frames per sequence
    "gaussian_noise": 31,
    "shot_noise": 31,
    "motion_blur": 31,
    "zoom_blur": 31,
    "snow": 31,
    "brightness": 31,
    "translate": 41,
    "rotate": 31,
    "tilt": 31,
    "scale": 31,
    # the release's 4 validation perturbations (make_imagenet_p.py's "Validation Data"), outside mFR
    "speckle_noise": 31,
    "gaussian_blur": 31,
    "spatter": 31,
    "shear": 31,
}
PERTURBATION_SUBSETS: Dict[str, tuple] = {
    "common": tuple(PERTURBATIONS)[:10],  # the 10 of the benchmark's mFR / mT5D, in the release's order
    "extra": tuple(PERTURBATIONS)[10:],   # the validation perturbations
    "all": tuple(PERTURBATIONS),
}
NOISE_PERTURBATIONS = ("gaussian_noise", "shot_noise", "speckle_noise")
GAUSSIAN_NOISE_STD = (0.03, 0.05, 0.08)
SHOT_NOISE_RATE = (300, 120, 60)
SPECKLE_NOISE_STD = (0.05, 0.10, 0.15)


def _frames(x: torch.Tensor, t: int) -> torch.Tensor:
    return x[:, None].expand(-1, t, -1, -1, -1)


def _noise(x, difficulty, scale, generator):
    std = GAUSSIAN_NOISE_STD[difficulty - 1]
    noisy = _frames(x, 30) + std * utils.randn((x.shape[0], 30) + x.shape[1:], generator, x.device)
    return torch.cat([x[:, None], noisy.clamp(0, 1)], dim=1)


def _shot(x, difficulty, scale, generator):
    rate = SHOT_NOISE_RATE[difficulty - 1]
    noisy = _base.poisson_counts(_frames(x, 30), rate, generator) / rate
    return torch.cat([x[:, None], noisy.clamp(0, 1)], dim=1)


def _speckle(x, difficulty, scale, generator):
    std = SPECKLE_NOISE_STD[difficulty - 1]
    frames = _frames(x, 30)
    noisy = frames + frames * (std * utils.randn((x.shape[0], 30) + x.shape[1:], generator, x.device))
    return torch.cat([x[:, None], noisy.clamp(0, 1)], dim=1)


def _motion_blur(x, difficulty, scale, generator):
    n, t = x.shape[0], 31
    angles = ((torch.arange(t, device=x.device) - 30) * 4.0).repeat(n)
    flat = _frames(x, t).reshape(n * t, *x.shape[1:])
    # ImageMagick's blur read back from its 8-bit PNG: rounded
    return _filters.round8(_filters.motion_blur(flat, 10, 3, angles, scale=scale)).view(n, t, *x.shape[1:])


def _pixel_grid(window, device):
    top, left, h, w = window
    ys, xs = torch.meshgrid(torch.arange(top, top + h, device=device, dtype=torch.float32),
                            torch.arange(left, left + w, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (h, w, 3): homogeneous (x, y, 1)


def _warp(x: torch.Tensor, inverse: torch.Tensor, window=None, edge: str = "pillow") -> torch.Tensor:
    """Frames from (N, C, H, W) images and (T, 3, 3) maps from output to input pixel coordinates
    (homogeneous, pixel centres at integers): (N, T, C, h, w), bilinear, black outside, of the
    output window (top, left, h, w) only (default the whole image).

    ``edge`` is what the release's library does at the picture's border: "pillow" (its affine
    transform) repeats the edge pixel for a sample within half a pixel outside and gives black
    beyond; "opencv" (warpPerspective, constant border) blends the neighbours outside as black."""
    n, c, h, w = x.shape
    window = (0, 0, h, w) if window is None else window
    t = inverse.shape[0]
    src = torch.einsum("tij,hwj->thwi", inverse, _pixel_grid(window, x.device))
    src = src[..., :2] / src[..., 2:3]
    grid = torch.stack([2 * src[..., 0] / max(w - 1, 1) - 1, 2 * src[..., 1] / max(h - 1, 1) - 1], dim=-1)
    frames = F.grid_sample(x.repeat_interleave(t, dim=0), grid.repeat(n, 1, 1, 1), mode="bilinear",
                           padding_mode="border" if edge == "pillow" else "zeros", align_corners=True)
    if edge == "pillow":
        # Pillow's bilinear filter: a sample inside [0, size) in its coordinates (pixel centres at
        # +0.5), the neighbours clamped to the image; black outside
        inside = (src[..., 0] >= -0.5) & (src[..., 0] < w - 0.5) & (src[..., 1] >= -0.5) & (src[..., 1] < h - 0.5)
        frames = frames * inside.repeat(n, 1, 1)[:, None].to(frames.dtype)
    return frames.clamp(0, 1).view(n, t, c, window[2], window[3])


def _about_centre(h, w, linear: torch.Tensor, shift_x: torch.Tensor = None) -> torch.Tensor:
    """(T, 3, 3) inverse maps q = L (p - c) + c - L shift, i.e. content transformed about the centre
    c = (w / 2, h / 2): the release's torchvision (0.2) put it at (w / 2 + 0.5, h / 2 + 0.5) in
    Pillow's coordinates, half a pixel right of and below the middle of an even-sized image."""
    t = linear.shape[0]
    centre = torch.tensor([w / 2, h / 2], dtype=linear.dtype, device=linear.device)
    shift = torch.zeros(t, 2, dtype=linear.dtype, device=linear.device)
    if shift_x is not None:
        shift[:, 0] = shift_x
    out = torch.zeros(t, 3, 3, dtype=linear.dtype, device=linear.device)
    out[:, :2, :2] = linear
    out[:, :2, 2] = centre - (linear @ (centre + shift)[:, :, None])[:, :, 0]
    out[:, 2, 2] = 1
    return out


def _zoom_maps(h, w, zooms: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(2, device=zooms.device)
    return _about_centre(h, w, eye[None] / zooms[:, None, None])


def _zoom_blur(x, difficulty, scale, generator, window=None):
    h, w = x.shape[-2:]
    zooms = 1 + 0.004 * torch.arange(31, device=x.device, dtype=torch.float32)
    # each zoom is an 8-bit image (Pillow's bilinear affine truncates), averaged in float (frame 0:
    # the image itself); the writer truncates the mean, as the release's ToPILImage did
    zoomed = _filters.quantize(_warp(x, _zoom_maps(h, w, zooms), window))
    counts = torch.arange(1, 32, device=x.device, dtype=torch.float32).view(1, 31, 1, 1, 1)
    return (zoomed.cumsum(dim=1) / counts).clamp(0, 1)


def _snow(x, difficulty, scale, generator):
    n, c, h, w = x.shape
    t = 31
    gh, gw, scale = _base.layer_grid(h, w, scale)  # below 224 px the flakes are drawn at 224 px, then averaged down
    layer = 0.05 + 0.3 * utils.randn((n, 1, gh, gw), generator, x.device)
    layer = _filters.clipped_zoom(layer, max(3 * scale, 1.0))
    layer = _filters.quantize(torch.where(layer < 0.5, torch.zeros_like(layer), layer))
    angles = (torch.arange(t, device=x.device) * 4.0 - 150).repeat(n)
    moving = _filters.motion_blur(_frames(layer, t).reshape(n * t, 1, gh, gw), 14, 4, angles, scale=scale)
    moving = _filters.pil_box_resize(_filters.round8(moving), h, w).view(n, t, 1, h, w)  # ImageMagick's PNG: rounded
    base = 0.85 * x + 0.15 * torch.maximum(x, _filters.rgb_to_gray(x) * 1.5 + 0.5)
    return (base[:, None] + moving + torch.flip(moving, dims=(-2, -1))).clamp(0, 1)


def _gaussian_blur(x, difficulty, scale, generator):
    # skimage's gaussian (mode "nearest") of the 8-bit crop, in float64 as skimage, truncated to 8 bits
    # here: a sigma-0.25 blur moves a pixel by ~3e-4 of its neighbours' differences, so many values lie
    # just below a level, which the release's np.uint8 drops and the writer's float32 slack
    # (utils.levels8) would keep (float32 frames were a level above the release's on 1.3% of a noisy
    # image's frame-0 values, 34% of a smooth one's; in float64 from the 8-bit levels themselves (float32's
    # k / 255 is up to 1.5e-5 levels off), truncated here, 0.002% and 6%: values at a level in float64 but
    # not in the release's summation order, the smooth image's flat areas)
    x = x.double() if x.device.type != "mps" else x  # (Apple's GPUs have no float64)
    levels = torch.round(x * 255)
    x = torch.where((x * 255 - levels).abs() < 1e-4, levels / 255, x)  # an 8-bit input exactly as the release's
    frames = [(torch.floor(_filters.gaussian_blur(x, 0.25 + 0.035 * i, truncate=6.0, scale=scale).clamp(0, 1) * 255
                           + 1e-9) / 255).float() for i in range(31)]  # float64 one frame at a time
    return torch.stack(frames, dim=1)


SPATTER_LIQUID = (0.65, 0.27, 3.7, 0.69)  # mean, std of the liquid noise, its blur sigma, threshold
SPATTER_INTENSITY = 0.6
DRIP = (0.05, 0.1, 0.15, 0.7)  # np.convolve taps: a row j takes DRIP[k] of row j + 1 - k


def _drip(liquid: torch.Tensor, scale: float) -> torch.Tensor:
    """The release's drip of a spatter layer (..., H, W) down its columns, np.convolve(column, DRIP,
    "same"): out[j] = 0.05 in[j + 1] + 0.1 in[j] + 0.15 in[j - 1] + 0.7 in[j - 2], zero beyond the
    image. Above 224 px (``scale`` > 1) the row offsets are scaled, a fractional offset's tap split
    between the two rows around it (linear interpolation); at 224 px and below (where the layer is
    drawn at 224 px) they are the release's."""
    weights = {}
    for k, tap in enumerate(DRIP):
        offset = (k - 1) * scale  # out[j] takes in[j - offset]
        low = math.floor(offset)
        for row, weight in ((low, tap * (1 - (offset - low))), (low + 1, tap * (offset - low))):
            if weight > 0:
                weights[row] = weights.get(row, 0.0) + weight
    h = liquid.shape[-2]
    top, bottom = max(max(weights), 0), max(-min(weights), 0)
    padded = F.pad(liquid, (0, 0, top, bottom))
    out = torch.zeros_like(liquid)
    for offset, weight in sorted(weights.items()):
        out += weight * padded[..., top - offset:top - offset + h, :]
    return out


def _spatter_frames(x: torch.Tensor, liquid: torch.Tensor, scale: float) -> torch.Tensor:
    """The release's spatter frames of images x (N, 3, H, W) from their liquid layers (N, 1, H', W',
    ``weather.liquid_layer``'s grid and scale): frame i is ImageNet-C's water spatter (intensity 0.6)
    with the layer dripped i times (``_drip``); all 31 x N masks in one batch."""
    n, _, h, w = x.shape
    layers = [liquid]
    for _ in range(30):
        layers.append(_drip(layers[-1], scale))
    layers = torch.stack(layers, dim=1).flatten(0, 1)
    drops = weather.water_drops(layers, SPATTER_INTENSITY, scale, h, w).view(n, 31, 1, h, w)
    return weather.wet(x[:, None], drops)


def _spatter(x, difficulty, scale, generator):
    n, _, h, w = x.shape
    liquid, s = weather.liquid_layer(n, h, w, *SPATTER_LIQUID, generator, x.device, scale)
    return _spatter_frames(x, liquid, s)


def _brightness(x, difficulty, scale, generator):
    shifts = (torch.arange(31, device=x.device, dtype=torch.float32) - 15) * 0.02
    return _filters.adjust_value(_frames(x, 31), shifts.view(1, 31, 1, 1, 1))


def _translate(x, difficulty, scale, generator, window=None):
    h, w = x.shape[-2:]
    shifts = (torch.arange(41, device=x.device, dtype=torch.float32) - 20) * scale
    eye = torch.eye(2, device=x.device).expand(41, 2, 2)
    return _warp(x, _about_centre(h, w, eye, shift_x=shifts), window)


def _rotate(x, difficulty, scale, generator, window=None):
    h, w = x.shape[-2:]
    angles = torch.deg2rad(torch.arange(31, device=x.device, dtype=torch.float32) - 15)
    cos, sin = torch.cos(angles), torch.sin(angles)
    # torchvision's affine (the release's trn_F.affine): output -> input by [[cos, sin], [-sin, cos]]
    # (y pointing down), so frame i is the release's frame i (lkfast.corrupt before VERSION 6 turned
    # the other way: the frames in reverse order, which no flip rate sees)
    linear = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    return _warp(x, _about_centre(h, w, linear), window)


def tilt_matrices(h: int, w: int, degrees: torch.Tensor, focal: Optional[float] = None) -> torch.Tensor:
    """(T, 3, 3) forward homographies of the release's tilt (rotate the image plane by the same
    angle about the x and y axes, seen by a camera at focal length ``focal``, by default
    sqrt(w^2 + h^2): the release's, of the whole image it tilts)."""
    f = math.hypot(w, h) if focal is None else float(focal)
    out = []
    for angle in torch.deg2rad(degrees.double()).tolist():
        ct, st = math.cos(angle), math.sin(angle)
        p1 = torch.tensor([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]], dtype=torch.float64)
        rx = torch.tensor([[1, 0, 0, 0], [0, ct, -st, 0], [0, st, ct, 0], [0, 0, 0, 1]], dtype=torch.float64)
        ry = torch.tensor([[ct, 0, -st, 0], [0, 1, 0, 0], [st, 0, ct, 0], [0, 0, 0, 1]], dtype=torch.float64)
        tz = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]], dtype=torch.float64)
        p2 = torch.tensor([[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]], dtype=torch.float64)
        out.append(p2 @ tz @ rx @ ry @ p1)
    return torch.stack(out)


def _tilt(x, difficulty, scale, generator, window=None, focal=None):
    """cv2.warpPerspective of the 8-bit image, which rounds (the other geometric frames are Pillow's,
    which truncates, as the writer does)."""
    h, w = x.shape[-2:]
    degrees = torch.arange(31, dtype=torch.float64) - 15

    def warp(images, f=None):
        return _warp(images, torch.linalg.inv(tilt_matrices(h, w, degrees, f)).float().to(x.device), window, "opencv")

    if focal is None:
        return _filters.round8(warp(x))
    return _filters.round8(torch.cat([warp(x[i:i + 1], f) for i, f in enumerate(focal)]))


def _scale(x, difficulty, scale, generator, window=None):
    h, w = x.shape[-2:]
    zooms = (torch.arange(31, device=x.device, dtype=torch.float32) * 2.5 + 40) / 100
    return _warp(x, _zoom_maps(h, w, zooms), window)


def _shear(x, difficulty, scale, generator, window=None):
    h, w = x.shape[-2:]
    shears = torch.deg2rad(torch.arange(31, device=x.device, dtype=torch.float32) - 15)
    # torchvision 0.2's affine (the release's) at angle 0: output -> input by [[cos, sin], [0, 1]] / cos
    # of the shear (input -> output [[1, -sin], [0, cos]]); today's torchvision shears otherwise
    ones, zeros = torch.ones_like(shears), torch.zeros_like(shears)
    linear = torch.stack([torch.stack([ones, torch.tan(shears)], -1),
                          torch.stack([zeros, 1 / torch.cos(shears)], -1)], -2)
    return _warp(x, _about_centre(h, w, linear), window)


GEOMETRIC = ("zoom_blur", "translate", "rotate", "tilt", "scale", "shear")  # the release moves the whole resized image
_SEQUENCES = {
    "gaussian_noise": _noise,
    "shot_noise": _shot,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "brightness": _brightness,
    "translate": _translate,
    "rotate": _rotate,
    "tilt": _tilt,
    "scale": _scale,
    "speckle_noise": _speckle,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "shear": _shear,
}


def perturbation_sequence(images: torch.Tensor, name: str, difficulty: int = 1,
                          generator: Optional[torch.Generator] = None,
                          crop: Optional[Union[int, tuple]] = None,
                          focal: Optional[Sequence[float]] = None) -> torch.Tensor:
    """ImageNet-P frames for a batch of images.

    images: float tensor (N, 3, H, W) in [0, 1], any device. name: one of PERTURBATIONS.
    difficulty: 1..3 (noise level for gaussian_noise / shot_noise / speckle_noise; see the module docstring).
    generator: torch.Generator or int seed (noise, snow and spatter are random; the rest are not).
    crop: optional centre crop (int or (h, w)) applied to every frame, so that geometric
    perturbations show the image's real surroundings instead of black (the release: the whole
    256-px resize, crop 224).
    focal: tilt only, one focal length per image (pixels); default hypot(width, height) of the
    images given, the release's (427 for a 341x256 image): for a window cut from a larger image.
    Returns (N, T, 3, h, w) in [0, 1], T = PERTURBATIONS[name] (41 for translate, else 31).
    """
    utils.check_choice(name, tuple(PERTURBATIONS), "perturbation")
    difficulty = utils.check_level(difficulty, 1, 3, "difficulty")
    utils.check_images(images)
    if crop is not None:
        crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        utils.center_crop(images[:1], crop)  # validates the size
    if focal is not None:
        focal = [float(f) for f in focal]
        if name != "tilt" or len(focal) != len(images) or not all(math.isfinite(f) and f > 0 for f in focal):
            raise ValueError(f"focal is for tilt, one positive focal length per image ({len(images)}); got {name!r} "
                             f"with {focal!r}")
    generator = utils.make_generator(generator, images.device)
    size = crop if crop is not None else images.shape[-2:]
    scale = _base.size_scale(*size)
    x = images.detach().float()
    with torch.no_grad():
        if name in GEOMETRIC:  # only the crop's pixels are computed
            window = None if crop is None else utils.center_crop_box(images.shape[-2:], crop) + crop
            extra = {} if focal is None else {"focal": focal}
            frames = _SEQUENCES[name](x, difficulty, scale, generator, window=window, **extra)
        else:
            frames = utils.center_crop(_SEQUENCES[name](x, difficulty, scale, generator), crop)
    assert frames.shape[1] == PERTURBATIONS[name]
    return frames.to(images.dtype)

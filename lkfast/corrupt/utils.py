"""Public helpers that lkfast.corrupt shares with the rest of lkfast: seeds and generators,
device-independent random draws, input checks, the centre crop, the 8-bit truncation.

Other packages (attacks, analyses, data) import these from here, never from a private module.

    >>> from lkfast.corrupt.utils import make_generator, uniform, check_images
    >>> g = make_generator(0, torch.device("cpu"))        # an int seed becomes a CPU generator
    >>> noise = uniform((2, 3, 8, 8), -1.0, 1.0, g, torch.device("cpu"))

Random numbers are drawn on the generator's device and then moved to the requested one, so the
same seed gives the same numbers whether the work runs on the CPU or a GPU.
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence, Tuple, Union

import torch

GeneratorLike = Optional[Union[torch.Generator, int]]
Generators = Union[None, int, torch.Generator, Sequence[torch.Generator]]  # ... or one generator per image

MIN_SIZE = 8  # the smallest image side the corruptions accept


# ---------------------------------------------------------------------------------- generators
def make_generator(generator: GeneratorLike, device: torch.device = None) -> Optional[torch.Generator]:
    """A torch.Generator from a generator, an int seed, or None.

    A generator is returned as it is; an int becomes a new CPU generator seeded with it (a CPU
    generator, whatever ``device`` is, so that one seed means one stream of numbers everywhere);
    None stays None (torch's global random state). ``device`` is accepted for symmetry with the
    draws below and is not used. Raises ValueError for anything else (a bool, a str, ...).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if is_integer(generator):
        g = torch.Generator(device="cpu")
        g.manual_seed(int(generator))
        return g
    raise ValueError(f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}")


def is_integer(value) -> bool:
    """An integer (Python's or NumPy's: anything ``numbers.Integral``), not a bool: seeds here; steps,
    counts and sizes in lkfast.attacks and lkfast.analysis (which import it from lkfast.attacks.core)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def seeded(generator: Generators, device, name: str) -> Generators:
    """``generator`` as the attacks and the frequency noise draw from it on ``device``: an int seed
    becomes one torch.Generator on ``device`` seeded with it, made once per call so that the call's
    draws continue one stream (as a generator passed in does); None, a generator, or one generator per
    image (a list or tuple) as they are. ValueError, saying what ``name`` takes, for anything else."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if is_integer(generator):
        return torch.Generator(device=device).manual_seed(int(generator))
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        return generator
    raise ValueError(f"{name}: generator must be a torch.Generator, an int seed, a list of one generator per "
                     f"image or None; got {type(generator).__name__}")


def generator_device(generator: Optional[torch.Generator], device) -> torch.device:
    """Where numbers are drawn: the generator's device, or ``device`` when there is no generator."""
    # Drawing where the generator lives and then moving the numbers makes the same seed give the
    # same result on CPU and GPU; a generator on the target device avoids the copy.
    return generator.device if generator is not None else torch.device(device)


def rand(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """U[0, 1) float32 numbers of ``shape`` on ``device``, drawn on the generator's device."""
    return torch.rand(shape, generator=generator, device=generator_device(generator, device)).to(device)


def randn(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """N(0, 1) float32 numbers of ``shape`` on ``device``, drawn on the generator's device."""
    return torch.randn(shape, generator=generator, device=generator_device(generator, device)).to(device)


def uniform(shape, low: float, high: float, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """U[low, high) float32 numbers of ``shape`` on ``device`` (``low + (high - low) * rand``)."""
    return low + (high - low) * rand(shape, generator, device)


def randint(high: int, shape, generator: Optional[torch.Generator], device, low: int = 0) -> torch.Tensor:
    """int64 integers uniform in [low, high) of ``shape`` on ``device``, drawn on the generator's device."""
    return torch.randint(low, high, shape, generator=generator,
                         device=generator_device(generator, device)).to(device)


# -------------------------------------------------------------------------------------- checks
def check_images(images, what: str = "images") -> torch.Tensor:
    """Return ``images`` unchanged if it is a float tensor (N, 3, H, W), N >= 1, H and W >= 8,
    values in [0, 1]; otherwise raise ValueError saying what was expected, what was found and
    how to convert (uint8 data, channels-last data, normalised data, a single image, NaN)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of shape (N, 3, H, W) with values in [0, 1]; "
                         f"got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must have shape (N, 3, H, W) (a batch of RGB images, channels first); "
                         f"got shape {tuple(images.shape)}. Use images.unsqueeze(0) for a single image "
                         "and images.permute(0, 3, 1, 2) for channels-last data.")
    if not images.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor in [0, 1]; got dtype {images.dtype}. "
                         "Convert uint8 images with images.float() / 255.")
    n, _, h, w = images.shape
    if n == 0:
        raise ValueError(f"{what} is an empty batch (N = 0)")
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"{what} must be at least {MIN_SIZE}x{MIN_SIZE} pixels; got {h}x{w}")
    lo, hi = torch.aminmax(images.detach())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(f"{what} must have values in [0, 1]; found min {lo:.4g}, max {hi:.4g}. "
                         "Divide uint8 data by 255, or undo the mean/std normalisation before corrupting.")
    return images


def check_choice(value, valid: Sequence[str], what: str) -> str:
    """Return ``value`` if it is one of ``valid``; else ValueError naming the valid choices."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid names are: {', '.join(valid)}")
    return value


def check_level(value, low: int, high: int, what: str) -> int:
    """``value`` as an int if it is an integer in low..high (a Python or NumPy integer, or a one-element
    integer tensor; not a bool); else ValueError."""
    try:
        level = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        level = None
    if level is None or not (low <= level <= high):
        raise ValueError(f"{what} must be an integer in {low}..{high}; got {value!r}")
    return level


# ------------------------------------------------------------------------------------ geometry
def center_crop(x: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """The central (h, w) window of the last two dims of ``x`` (a view), torchvision's rounding
    (top = round((H - h) / 2)); ``size`` None returns ``x``. ValueError if the window is larger
    than the image."""
    if size is None:
        return x
    top, left = center_crop_box(x.shape[-2:], size)
    return x[..., top:top + size[0], left:left + size[1]]


def center_crop_box(shape: Tuple[int, int], size: Tuple[int, int]) -> Tuple[int, int]:
    """(top, left) of ``center_crop``'s (h, w) window in an image of ``shape`` (H, W); ValueError if
    the window is larger than the image."""
    (h, w), (ch, cw) = shape, size
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the images ({h}x{w})")
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


# -------------------------------------------------------------------------------------- 8 bits
# float32 noise: an identity warp or a whole-pixel shift lands a pixel of level k at k - 7e-6
# levels, which plain truncation stores as k - 1 (a fifth of the pixels of lkfast's ImageNet-P
# translate frames, before lkfast.corrupt VERSION 6)
TRUNCATION_SLACK = 1e-3  # in levels


def levels8(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> 8-bit levels 0..255 (float) by truncation, floor(255 x), as the release's
    ``np.uint8(255 x)`` stored its corrupted images, with values within TRUNCATION_SLACK of the
    next level counted as that level (float32 noise; the release computed in float64); values
    outside [0, 1] are clipped first. lkfast stores every corrupted image or frame through this."""
    return torch.floor(x.clamp(0, 1) * 255 + TRUNCATION_SLACK).clamp(max=255)


__all__ = ["GeneratorLike", "make_generator", "generator_device", "rand", "randn", "uniform", "randint",
           "check_images", "check_choice", "check_level", "center_crop", "center_crop_box", "levels8", "MIN_SIZE", "TRUNCATION_SLACK"]

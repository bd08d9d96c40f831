"""ImageNet-C corruptions and ImageNet-P perturbation sequences on batched tensors (CPU or GPU).

    >>> import torch, lkfast.corrupt as lc
    >>> x = torch.rand(8, 3, 224, 224)
    >>> y = lc.corrupt(x, "snow", 3, generator=torch.Generator().manual_seed(0))
    >>> seq = lc.perturbation_sequence(x, "translate")          # (8, 41, 3, 224, 224)

Parameters are those of the ImageNet-C / ImageNet-P release (Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019), defined there for
224x224 images. At other sizes every length (blur radius, displacement, texture scale) is
multiplied by min(H, W) / 224; per-pixel parameters stay as they are. Below 224 px blur kernels are
the release's carried to the smaller grid and snow's and spatter's layers are drawn at 224 px
(``blur``, ``weather``), so that these corruptions keep their strength relative to the content.
Three do not, by nature: pixelate and JPEG work on blocks of the image's own pixels, and glass blur
moves whole pixels, so on a 64-px image (an area-downsampled 224-px one) they change it more than
the 224-px corruption averaged down does (measured: pixelate about 10x, JPEG 3-4.5x, glass blur
1.1-1.6x the mean change); a faithful version would leave a 64-px image almost untouched. Each
family module documents its tables and where the batched version differs from the release's
per-image code.

Randomness comes from ``generator`` (a torch.Generator or an int seed): the same seed gives the
same output, and the same output on CPU and GPU (numbers are drawn on the generator's device).

Everything here is a pure function of tensors: no file is read or written, except that frost
reads the release's frost photographs once. Reading image folders and writing the ImageNet-C /
ImageNet-P datasets to disk is ``lkfast.data`` (``lkfast.data.writer.render``; the command
``python -m lkfast.corrupt SRC DST --benchmark c|p`` is its entry point). Seeds, random draws,
input checks and the centre crop that other packages share are public in
``lkfast.corrupt.utils``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import blur, digital, noise, utils, weather
from .perturb import (GEOMETRIC as GEOMETRIC_PERTURBATIONS, NOISE_PERTURBATIONS, PERTURBATION_SUBSETS, PERTURBATIONS,
                      perturbation_sequence)

CORRUPTIONS: Dict[str, Callable] = {
    # the 15 of the benchmark, in the release's order
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "zoom_blur": blur.zoom_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": weather.brightness,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
    # the 4 extra ("validation") corruptions
    "speckle_noise": noise.speckle_noise,
    "gaussian_blur": blur.gaussian_blur,
    "spatter": weather.spatter,
    "saturate": digital.saturate,
}

_ALL = tuple(CORRUPTIONS)
SUBSETS: Dict[str, Tuple[str, ...]] = {
    "common": _ALL[:15],
    "extra": _ALL[15:],
    "all": _ALL,
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
SEVERITIES = (1, 2, 3, 4, 5)

# Bump when any corruption's or perturbation's output changes for the same input and seed: images
# rendered and cached with an older version (the embedded default's ImageNet-C and -P) are rebuilt.
# 2: below 224 px, defocus and Gaussian blurs carry the release's kernels to the smaller grid;
# 3: motion blur's too (motion_blur, snow, and the perturbations motion_blur and snow);
# 4: carried kernels spread by Lanczos-3 (not linearly); snow's and spatter's texture layers drawn
# at 224 px below it, spatter's noise scaled above it; 5: elastic_transform resamples twice, as the release;
# 6: 8 bits as the release: pixelate is Pillow's to the bit, ImageMagick's motion blur (motion_blur, snow's
# flakes) and OpenCV's tilt round, ImageNet-P's zoom blur averages 8-bit zooms, and the truncation that
# stores every image (utils.levels8) no longer drops a level for float32 noise just below it; ImageNet-P's
# rotate turns as torchvision's affine (the release's frame order); 7: ImageNet-P's geometric frames turn and
# zoom about (w / 2, h / 2), as the release's torchvision 0.2 and OpenCV, and Pillow's border (the edge pixel
# repeated half a pixel out, then black) for its affine ones; 8: spatter's distances are OpenCV's 5x5 chamfer
# distance (the release's distanceTransform), not the Euclidean.
VERSION = 8


def names(subset: str = "all") -> List[str]:
    """Corruption names of a subset: "common" (the 15 of mCE), "extra" (speckle_noise,
    gaussian_blur, spatter, saturate), "all" (19), or an ImageNet-C category of the 15: "noise",
    "blur", "weather", "digital"."""
    utils.check_choice(subset, tuple(SUBSETS), "subset")
    return list(SUBSETS[subset])


def perturbation_names(subset: str = "all") -> List[str]:
    """ImageNet-P perturbation names of a subset: "common" (the 10 of mFR and mT5D), "extra" (the
    release's validation perturbations: speckle_noise, gaussian_blur, spatter, shear) or "all" (14)."""
    utils.check_choice(subset, tuple(PERTURBATION_SUBSETS), "subset")
    return list(PERTURBATION_SUBSETS[subset])


def corrupt(images: torch.Tensor, name: str, severity: int,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Corrupt a batch of RGB images.

    images: float tensor (N, 3, H, W), values in [0, 1], any device, H and W >= 8.
    name: one of ``names("all")``. severity: integer 1..5.
    generator: torch.Generator or int seed for reproducible output (None: torch's global RNG).
    Returns a tensor of the same shape, dtype and device, values in [0, 1].
    Raises ValueError for a wrong shape/dtype/range, an unknown name or a severity outside 1..5.
    """
    utils.check_choice(name, _ALL, "corruption")
    severity = utils.check_level(severity, 1, 5, "severity")
    utils.check_images(images)
    generator = utils.make_generator(generator, images.device)
    x = images.detach().float()
    with torch.no_grad():
        out = CORRUPTIONS[name](x, severity, generator)
    return out.to(images.dtype)


from .weather import FrostPhotosMissing, frost_directory  # noqa: E402

__all__ = ["corrupt", "names", "perturbation_names", "perturbation_sequence", "FrostPhotosMissing", "frost_directory", "CORRUPTIONS",
           "PERTURBATIONS", "PERTURBATION_SUBSETS", "NOISE_PERTURBATIONS", "GEOMETRIC_PERTURBATIONS", "SUBSETS", "SEVERITIES", "VERSION"]

"""The synthetic default benchmark: seeded shape images with foreground masks, and the variants the
six robustness benchmarks need, written in the real benchmarks' folder layouts.

    render(classes, seed, split, count, ...)   -> Rendered (uint8 images, masks, foregrounds, backgrounds)
    SyntheticConfig(...)                        what to generate (sizes, counts, seed)
    build_base(root, config)                    train/, val/, val-masks/, imagenet-c/, imagenet-p/,
                                                imagenet-9/, imagenet-r/ under root
    build_reference_sets(root, config, model)   imagenet-a/ and imagenet-o/ (need a trained reference)
    class_space()                               class names, folder -> index, subsets for A/R/O/9

Ten shape classes (``CLASSES``) are drawn at 64x64 on textured backgrounds. In ``train`` and ``val``
a share ``background_correlation`` of the images (0.8 by default) carries its class's own
background pattern and colours, the rest a background drawn at random, so a model can learn to read
the background and the ImageNet-9 variants measure how much it does. Four further shapes
(``OOD_CLASSES``) never appear in training: they are ImageNet-O's anomalies.

Every number comes from ``numpy.random.default_rng`` seeded with (seed, split, index): an image
does not depend on how many others are drawn, and a seed gives the same images on every machine.
Pixels are computed with +, -, x, / and comparisons only (IEEE-exact), on a 2x2 supersampled grid;
the only transcendental values (rotation cosines, polygon vertices) are rounded to 2^-30 first, so
a last-bit difference between two maths libraries cannot reach a pixel.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

CLASSES = ("circle", "square", "triangle", "plus", "ring", "star", "hexagon", "crescent", "arrow", "heart")
OOD_CLASSES = ("bar", "lshape", "semicircle", "hourglass")
IN9_CLASSES = CLASSES[:9]
IN9_FOLDERS = tuple(f"{i:02d}_{name}" for i, name in enumerate(IN9_CLASSES))
IN9_VARIANTS = ("original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "mixed_same", "mixed_rand", "mixed_next")
SPLITS = {"train": 1, "val": 2, "r": 3, "ood": 4, "a-pool": 5, "p": 6}
STYLES = ("photo", "sketch")
SUPERSAMPLE = 2
_GENERATOR_VERSION = 2  # bump when rendering changes: cached sets are rebuilt


def _q(value: float) -> float:
    """``value`` rounded to a multiple of 2^-30 (libm last-bit differences cannot change it)."""
    return round(value * (1 << 30)) / (1 << 30)


def _regular_polygon(n: int, radius: float, phase: float = math.pi / 2) -> List[tuple]:
    return [(_q(radius * math.cos(phase + 2 * math.pi * k / n)), _q(radius * math.sin(phase + 2 * math.pi * k / n)))
            for k in range(n)]


def _star(points: int, outer: float, inner: float) -> List[tuple]:
    out = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else inner
        angle = math.pi / 2 + math.pi * k / points
        out.append((_q(r * math.cos(angle)), _q(r * math.sin(angle))))
    return out


def _in_polygon(u: np.ndarray, v: np.ndarray, vertices: Sequence[tuple]) -> np.ndarray:
    """Even-odd point-in-polygon test (vertices in order; v points up)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(vertices)
    for k in range(n):
        x1, y1 = vertices[k]
        x2, y2 = vertices[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < x_at)
    return inside


_TRIANGLE = _regular_polygon(3, 1.0)
_HEXAGON = _regular_polygon(6, 0.9)
_STAR = _star(5, 1.0, 0.42)
_ARROW = [(-0.9, -0.25), (0.1, -0.25), (0.1, -0.7), (0.95, 0.0), (0.1, 0.7), (0.1, 0.25), (-0.9, 0.25)]
_LSHAPE = [(-0.7, -0.8), (-0.7, 0.8), (-0.2, 0.8), (-0.2, -0.3), (0.7, -0.3), (0.7, -0.8)]
_HOURGLASS = [(-0.75, -0.85), (0.75, -0.85), (0.1, 0.0), (0.75, 0.85), (-0.75, 0.85), (-0.1, 0.0)]


def _heart(u, v):
    x, y = u * 1.2, v * 1.2 + 0.15
    r = x * x + y * y - 1.0
    return r * r * r - x * x * y * y * y <= 0.0


SHAPES: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 0.81,
    "square": lambda u, v: (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75),
    "triangle": lambda u, v: _in_polygon(u, v + 0.15, _TRIANGLE),
    "plus": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.9)) | ((np.abs(u) <= 0.9) & (np.abs(v) <= 0.3)),
    "ring": lambda u, v: (u * u + v * v <= 0.81) & (u * u + v * v >= 0.25),
    "star": lambda u, v: _in_polygon(u, v, _STAR),
    "hexagon": lambda u, v: _in_polygon(u, v, _HEXAGON),
    "crescent": lambda u, v: (u * u + v * v <= 0.81) & ((u - 0.45) * (u - 0.45) + v * v > 0.5625),
    "arrow": lambda u, v: _in_polygon(u, v, _ARROW),
    "heart": _heart,
    # held out: ImageNet-O's anomalies
    "bar": lambda u, v: (np.abs(u) <= 0.95) & (np.abs(v) <= 0.18),
    "lshape": lambda u, v: _in_polygon(u, v, _LSHAPE),
    "semicircle": lambda u, v: (u * u + v * v <= 0.81) & (v <= 0.15),
    "hourglass": lambda u, v: _in_polygon(u, v, _HOURGLASS),
}

# Each training class's own background: a pattern (index into _pattern) and two colours.
_HOME_COLOURS = [((200, 60, 40), (240, 170, 120)), ((40, 90, 200), (150, 190, 250)), ((40, 150, 60), (170, 230, 150)),
                 ((200, 180, 30), (250, 240, 160)), ((130, 50, 170), (210, 160, 240)), ((30, 160, 170), (160, 240, 230)),
                 ((120, 80, 40), (210, 170, 110)), ((90, 90, 90), (200, 200, 200)), ((200, 40, 140), (250, 170, 210)),
                 ((20, 40, 90), (90, 130, 190))]
NUM_PATTERNS = 10


@dataclass
class Rendered:
    """A batch of rendered images, all uint8 and channels-last: ``images`` (N, H, W, 3),
    ``masks`` (N, H, W) foreground coverage 0..255, ``foregrounds`` and ``backgrounds`` (N, H, W, 3)
    the two layers (``images`` = foreground over background through ``masks``), ``labels`` (N,)
    indices into the ``classes`` given to ``render``, and ``home_background`` (N,) whether the
    background is the class's own."""
    images: np.ndarray
    masks: np.ndarray
    foregrounds: np.ndarray
    backgrounds: np.ndarray
    labels: np.ndarray
    home_background: np.ndarray


def composite(foreground: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """uint8 foreground over background through the 0..255 mask (integer arithmetic, rounded)."""
    a = mask.astype(np.int32)[..., None]
    out = (foreground.astype(np.int32) * a + background.astype(np.int32) * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells+1)^2 grid, bilinearly interpolated to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _pattern(kind: int, size: int, period: int, phase: int) -> np.ndarray:
    """A 0/1 texture of integer pixel arithmetic (no trigonometry): stripes, checks, dots, ..."""
    i = np.arange(size)[:, None] + phase
    j = np.arange(size)[None, :] + phase
    p = period
    if kind == 0:
        t = (i // p) % 2 + 0 * j
    elif kind == 1:
        t = (j // p) % 2 + 0 * i
    elif kind == 2:
        t = ((i + j) // p) % 2
    elif kind == 3:
        t = ((i - j + 4 * size) // p) % 2
    elif kind == 4:
        t = (i // p + j // p) % 2
    elif kind == 5:
        di, dj = 2 * (i % p) - p, 2 * (j % p) - p
        t = (di * di + dj * dj < p * p).astype(np.int64)
    elif kind == 6:
        t = ((i % p < 2) | (j % p < 2)).astype(np.int64)
    elif kind == 7:
        c = size // 2 + phase
        t = (np.maximum(np.abs(i - c), np.abs(j - c)) // p) % 2
    elif kind == 8:
        t = (((i // p) % 3 == 0) & ((j // p) % 2 == 0)).astype(np.int64)
    else:
        c = size // 2 + phase
        t = (((i - c) * (i - c) + (j - c) * (j - c)) // (p * p * 2)) % 2
    return t.astype(np.float64)


def _background(rng: np.random.Generator, size: int, kind: int, colours, jitter: int = 25) -> np.ndarray:
    c0 = np.clip(np.array(colours[0], dtype=np.float64) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
    c1 = np.clip(np.array(colours[1], dtype=np.float64) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
    period = int(rng.integers(4, 9)) * max(1, size // 64)
    t = _pattern(kind, size, period, int(rng.integers(0, 16)))[..., None]
    bg = c0 * (1 - t) + c1 * t
    bg = bg * (0.8 + 0.4 * _value_noise(rng, size, 4))[..., None]
    bg = bg + rng.integers(-8, 9, (size, size, 3))
    return np.clip(np.round(bg), 0, 255).astype(np.uint8)


def _coordinates(size: int, pad: int = 0):
    """Supersampled pixel-centre coordinates in the unit frame of the central size x size image
    (x right, y up, both in [-1, 1] there); a ``pad`` widens the view by pad pixels each side."""
    n = (size + 2 * pad) * SUPERSAMPLE
    t = ((np.arange(n) + 0.5) / SUPERSAMPLE - pad) / size * 2.0 - 1.0
    return t[None, :], -t[:, None]


def _coverage(inside: np.ndarray) -> np.ndarray:
    """Mean of each SUPERSAMPLE^2 block of a boolean array as 0..255 (integer rounding)."""
    h, w = inside.shape[0] // SUPERSAMPLE, inside.shape[1] // SUPERSAMPLE
    count = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).sum(axis=(1, 3)).astype(np.int64)
    total = SUPERSAMPLE * SUPERSAMPLE
    return ((count * 255 + total // 2) // total).astype(np.uint8)


def _erode(inside: np.ndarray, radius: int) -> np.ndarray:
    out = inside.copy()
    for _ in range(radius):
        shrunk = out.copy()
        shrunk[1:] &= out[:-1]
        shrunk[:-1] &= out[1:]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        out = shrunk
    return out


def _hue_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour: one of six hue sectors, linear inside the sector (no trigonometry)."""
    h = rng.random() * 6
    sector, f = int(h), h - int(h)
    lo, hi = 40.0, 235.0
    mid_up, mid_down = lo + (hi - lo) * f, hi - (hi - lo) * f
    rgb = [(hi, mid_up, lo), (mid_down, hi, lo), (lo, hi, mid_up), (lo, mid_down, hi), (mid_up, lo, hi),
           (hi, lo, mid_down)][sector]
    return np.array(rgb)


def render_one(shape: str, rng: np.random.Generator, size: int = 64, style: str = "photo",
               background_kind: Optional[int] = None, background_colours=None, pad: int = 0,
               scale_range=(0.55, 0.85)):
    """One image's layers: (foreground (S, S, 3), mask (S, S), background (S, S, 3)), uint8, with
    S = size + 2 * pad. ``style`` "photo": a shaded colour shape on a textured background
    (``background_kind`` 0..9 with ``background_colours``, or random when None); "sketch": a hatched
    dark-ink shape with an outline on paper (the ImageNet-R stand-in)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    full = size + 2 * pad
    x, y = _coordinates(size, pad)
    scale = rng.uniform(*scale_range)
    angle = rng.uniform(0.0, 2 * math.pi)
    cos_a, sin_a = _q(math.cos(angle)), _q(math.sin(angle))
    aspect = rng.uniform(0.85, 1.15)
    cx, cy = rng.uniform(-1, 1) * (1 - scale) * 0.8, rng.uniform(-1, 1) * (1 - scale) * 0.8
    dx, dy = x - cx, y - cy
    u = (dx * cos_a + dy * sin_a) / (scale * aspect)
    v = (dy * cos_a - dx * sin_a) * aspect / scale
    inside = SHAPES[shape](u, v)
    mask = _coverage(inside)
    px = (np.arange(full)[None, :] + 0.5) / full
    py = (np.arange(full)[:, None] + 0.5) / full
    if style == "photo":
        colour = _hue_colour(rng)
        gx, gy = rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.35)
        shade = 1.0 + gx * (px - 0.5) + gy * (py - 0.5)
        fg = np.clip(np.round(colour * shade[..., None]), 0, 255).astype(np.uint8)
        kind = int(rng.integers(0, NUM_PATTERNS)) if background_kind is None else background_kind
        colours = background_colours if background_colours is not None else (
            tuple(int(c) for c in rng.integers(0, 256, 3)), tuple(int(c) for c in rng.integers(0, 256, 3)))
        bg = _background(rng, full, kind, colours)
    else:
        ink = rng.integers(0, 70, 3).astype(np.float64)
        period = int(rng.integers(3, 6)) * SUPERSAMPLE
        ii = np.arange(inside.shape[0])[:, None]
        jj = np.arange(inside.shape[1])[None, :]
        hatch = ((ii + jj) % period) < SUPERSAMPLE
        outline = inside & ~_erode(inside, int(rng.integers(3, 7)))
        drawn = _coverage(outline | hatch)  # ink where the pen went; paper inside the rest of the shape
        paper = np.array([245.0, 240.0, 228.0]) + rng.integers(-10, 11, 3)
        ink_share = drawn.astype(np.float64)[..., None] / 255
        fg = np.clip(np.round(paper * (1 - ink_share) + ink * ink_share), 0, 255).astype(np.uint8)
        noise = rng.integers(-6, 7, (full, full, 1))
        bg = np.clip(np.round(paper + noise), 0, 255).astype(np.uint8)
    return fg, mask, bg


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index, _GENERATOR_VERSION])


def render(classes: Sequence[str], seed: int, split: str, count_per_class: int, size: int = 64,
           style: str = "photo", background_correlation: float = 0.8, background_from: Optional[str] = None,
           pad: int = 0, start: int = 0, scale_range=(0.55, 0.85)) -> Rendered:
    """``count_per_class`` images of each shape in ``classes`` (class-major order).

    split: one of ``SPLITS`` (different splits never share an image). background_correlation: the
    share of images on their class's own background (only for the ten training classes; others get
    random ones). background_from "other": every background is another class's own (the -A pool's
    misleading cue). start: index of the first image in each class (to extend a set). Image k of a
    class is the same whatever ``count_per_class`` is."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    fgs, masks, bgs, labels, home = [], [], [], [], []
    for label, shape in enumerate(classes):
        class_id = list(SHAPES).index(shape)
        for k in range(start, start + count_per_class):
            rng = _rng(seed, split, class_id * 1_000_000 + k)
            trained = shape in CLASSES
            kind, colours, is_home = None, None, False
            if background_from == "other" and trained:
                own = CLASSES.index(shape)
                kind = (own + 1 + int(rng.integers(0, len(CLASSES) - 1))) % len(CLASSES)
                colours = _HOME_COLOURS[kind]
            elif trained and rng.random() < background_correlation:
                kind, colours, is_home = CLASSES.index(shape), _HOME_COLOURS[CLASSES.index(shape)], True
            fg, mask, bg = render_one(shape, rng, size, style, kind, colours, pad=pad, scale_range=scale_range)
            fgs.append(fg), masks.append(mask), bgs.append(bg), labels.append(label), home.append(is_home)
    fgs, masks, bgs = np.stack(fgs), np.stack(masks), np.stack(bgs)
    return Rendered(composite(fgs, masks, bgs), masks, fgs, bgs, np.array(labels), np.array(home))


# --- what to build ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic benchmark. Counts are per class."""
    seed: int = 0
    size: int = 64
    # Sized for the embedded default's time budget on a 2-core CPU: the analyses run on every val
    # image, and -C multiplies its images by 95.
    train_per_class: int = 120
    val_per_class: int = 20
    c_per_class: int = 4           # val images corrupted (19 corruptions x 5 severities each)
    p_per_class: int = 1           # sequences per perturbation
    in9_per_class: int = 20
    r_per_class: int = 20
    ood_per_class: int = 20        # per held-out shape
    a_pool_per_class: int = 60     # candidates the reference model filters for -A
    a_min_confidence: float = 0.5
    background_correlation: float = 0.8
    corruptions: Optional[Tuple[str, ...]] = None    # None: all 19
    perturbations: Optional[Tuple[str, ...]] = None  # None: the 10 of mFR

    def key(self) -> str:
        from lkfast.cache import config_key

        return config_key("synthetic", _GENERATOR_VERSION, dataclasses.asdict(self))


def class_space() -> dict:
    """The synthetic benchmark's class space, in the shape the eval's class-space hook reads:
    ``classes`` (folder names in index order), ``folder_to_index``, the index subsets ``a_indices``,
    ``r_indices``, ``o_indices`` (all ten: every class appears in each set), ``in9_map`` (the model's
    class -> ImageNet-9 class, -1 for none: the first nine classes are ImageNet-9's, in the folders
    ``in9_folders`` 00_circle ... 08_arrow), and ``ood_classes`` (the held-out shapes, never a model
    output)."""
    n = len(CLASSES)
    return {"classes": list(CLASSES), "folder_to_index": {c: i for i, c in enumerate(CLASSES)},
            "a_indices": list(range(n)), "r_indices": list(range(n)), "o_indices": list(range(n)),
            "in9_map": [i if i < len(IN9_CLASSES) else -1 for i in range(n)], "in9_folders": list(IN9_FOLDERS),
            "ood_classes": list(OOD_CLASSES)}


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: Sequence[str], classes=CLASSES,
                  stem: str = "img") -> None:
    counters: Dict[int, int] = {}
    for image, label in zip(images, labels):
        k = counters.get(int(label), 0)
        counters[int(label)] = k + 1
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        _save_png(folder / f"{names[int(label)] if names else stem}_{k:05d}.png", image)


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


def _to_uint8(tensor) -> np.ndarray:
    """Corrupted images or frames (N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, stored as the writer
    stores them (truncation, ``lkfast.data.io.to_uint8``; rounded before lkfast.corrupt VERSION 6)."""
    from .io import to_uint8

    return to_uint8(tensor).permute(0, 2, 3, 1).numpy()


@functools.lru_cache(maxsize=2)
def _val_set(config: SyntheticConfig) -> Rendered:
    return render(CLASSES, config.seed, "val", config.val_per_class, config.size,
                  background_correlation=config.background_correlation)


def build_split(root, config: SyntheticConfig, split: str) -> None:
    """Write one ImageFolder split (``train`` or ``val``) as root/<class>/<split>_<k>.png."""
    if split == "val":
        data = _val_set(config)
    else:
        data = render(CLASSES, config.seed, split, config.train_per_class, config.size,
                      background_correlation=config.background_correlation)
    _write_folder(Path(root), data.images, data.labels, None, stem=split)


def build_masks(root, config: SyntheticConfig) -> None:
    """val's foreground masks as 0..255 grey PNGs, same class folders and file names as ``val/``."""
    data = _val_set(config)
    _write_folder(Path(root), data.masks, data.labels, None, stem="val")


def _check_frost(config: SyntheticConfig) -> None:
    """FrostPhotosMissing (saying what to install) when ``config``'s ImageNet-C needs frost and the
    release's frost photographs are not here."""
    from lkfast.corrupt import frost_directory

    if config.corruptions is None or "frost" in config.corruptions:
        frost_directory()


def build_imagenet_c(root, config: SyntheticConfig, progress=None) -> None:
    """ImageNet-C layout: root/<corruption>/<severity>/<class>/*.png, the 19 corruptions (or
    ``config.corruptions``) x 5 severities of the first ``c_per_class`` val images of each class (the
    same file names as in val/)."""
    import torch

    from lkfast.corrupt import CORRUPTIONS, SEVERITIES, corrupt

    _check_frost(config)  # before any corruption is rendered, not at the sixth
    data = _val_set(config)
    keep = np.concatenate([np.flatnonzero(data.labels == c)[:config.c_per_class] for c in range(len(CLASSES))])
    data = Rendered(*(getattr(data, f.name)[keep] for f in dataclasses.fields(Rendered)))
    x = _to_tensor(data.images)
    for n, name in enumerate(CORRUPTIONS):
        if config.corruptions is not None and name not in config.corruptions:
            continue
        for severity in SEVERITIES:
            g = torch.Generator().manual_seed(config.seed * 1000 + n * 10 + severity)
            out = _to_uint8(corrupt(x, name, severity, generator=g))
            _write_folder(Path(root) / name / str(severity), out, data.labels, None, stem="val")
            if progress is not None:
                progress(1)


def build_imagenet_p(root, config: SyntheticConfig, progress=None) -> None:
    """ImageNet-P layout with .npy sequences: root/<perturbation>/<class>/p_<k>.npy, each a uint8
    array (frames, H, W, 3), difficulty 1. Frames are computed on a view 8 px wider each side and
    cropped, so geometric perturbations show real surroundings."""
    import torch

    from lkfast.corrupt import PERTURBATION_SUBSETS, PERTURBATIONS, perturbation_sequence

    pad = config.size // 8
    data = render(CLASSES, config.seed, "p", config.p_per_class, config.size, pad=pad,
                  background_correlation=config.background_correlation)
    x = _to_tensor(data.images)
    for n, name in enumerate(PERTURBATIONS):  # n: the seed's, the release's order (the 10, then the validation 4)
        if name not in (config.perturbations or PERTURBATION_SUBSETS["common"]):
            continue
        g = torch.Generator().manual_seed(config.seed * 1000 + n)
        frames = perturbation_sequence(x, name, 1, generator=g, crop=config.size)
        counters: Dict[int, int] = {}
        for seq, label in zip(frames, data.labels):
            k = counters.get(int(label), 0)
            counters[int(label)] = k + 1
            folder = Path(root) / name / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"p_{k:05d}.npy", _to_uint8(seq))
        if progress is not None:
            progress(1)


def imagenet9_variants(data: Rendered, seed: int):
    """({variant: uint8 images}, {mixed variant: background partner index}) for ``data``, images in
    the order of ``data``. The backgrounds-challenge variants:
    original; only_fg (foreground on black); no_fg (foreground blacked out); only_bg_b (black
    bounding box over the foreground); only_bg_t (the true background); mixed_same / mixed_rand /
    mixed_next (the foreground over the background of another image of the same class / of a random
    other class / of the next class). Partners are drawn with ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng([seed, 9, _GENERATOR_VERSION])
    n = len(data.labels)
    black = np.zeros_like(data.foregrounds)
    by_class = {int(c): np.flatnonzero(data.labels == c) for c in np.unique(data.labels)}
    classes = sorted(by_class)
    same, rand, nxt = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    for i in range(n):
        c = int(data.labels[i])
        pool = by_class[c][by_class[c] != i]
        same[i] = rng.choice(pool) if len(pool) else i
        other = classes[(classes.index(c) + 1 + int(rng.integers(0, len(classes) - 1))) % len(classes)]
        rand[i] = rng.choice(by_class[other])
        following = classes[(classes.index(c) + 1) % len(classes)]
        nxt[i] = rng.choice(by_class[following])
    box = np.zeros_like(data.masks)
    for i in range(n):
        rows, cols = np.flatnonzero(data.masks[i].any(axis=1)), np.flatnonzero(data.masks[i].any(axis=0))
        if len(rows):
            box[i, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 255
    return {
        "original": data.images,
        "only_fg": composite(data.foregrounds, data.masks, black),
        "no_fg": composite(black, data.masks, data.backgrounds),
        "only_bg_b": composite(black, box, data.backgrounds),
        "only_bg_t": data.backgrounds,
        "mixed_same": composite(data.foregrounds, data.masks, data.backgrounds[same]),
        "mixed_rand": composite(data.foregrounds, data.masks, data.backgrounds[rand]),
        "mixed_next": composite(data.foregrounds, data.masks, data.backgrounds[nxt]),
    }, {"mixed_same": same, "mixed_rand": rand, "mixed_next": nxt}


def build_imagenet_9(root, config: SyntheticConfig) -> None:
    """ImageNet-9 layout: root/<variant>/val/<NN_class>/*.png for every variant in ``IN9_VARIANTS``,
    with the release's numbered folders (00_circle ... 08_arrow: the first nine classes; as with
    ImageNet-9, a model's other class, heart, maps to no ImageNet-9 class and counts as wrong). Built
    from val-distribution images 10_000 on (not the clean val images); backgrounds of the mixed
    variants come from all ten classes. The background partner of each mixed image (an index into
    the ten-class set, class-major) is in root/partners.json."""
    data = render(CLASSES, config.seed, "val", config.in9_per_class, config.size,
                  background_correlation=config.background_correlation, start=10_000)
    variants, partners = imagenet9_variants(data, config.seed)
    keep = data.labels < len(IN9_CLASSES)
    for name, images in variants.items():
        _write_folder(Path(root) / name / "val", images[keep], data.labels[keep], None, classes=IN9_FOLDERS,
                      stem="in9")
    (Path(root) / "partners.json").write_text(json.dumps({k: v.tolist() for k, v in partners.items()}))


def build_imagenet_r(root, config: SyntheticConfig) -> None:
    """ImageNet-R layout: root/<class>/*.png, the ten classes drawn in the sketch style."""
    data = render(CLASSES, config.seed, "r", config.r_per_class, config.size, style="sketch")
    _write_folder(Path(root), data.images, data.labels, None, stem="r")


def build_base(root, config: SyntheticConfig = SyntheticConfig(), log=None, progress: bool = True) -> Dict[str, Path]:
    """Build (or verify) every part that needs no trained model under ``root``, each a separately
    verified cache entry: train, val, val-masks, imagenet-c, imagenet-p, imagenet-9, imagenet-r.
    Returns {part: folder}. Shows a progress bar (tqdm) while building, unless ``progress`` is False."""
    from tqdm import tqdm

    from lkfast.cache import config_key, ensure_entry
    from lkfast.corrupt import CORRUPTIONS, PERTURBATION_SUBSETS, VERSION

    root = Path(root)
    key = config.key()
    # the corrupted sets also depend on lkfast.corrupt's version; the clean parts (and the models
    # trained on them) do not
    corrupted_key = config_key(key, "corrupt", VERSION)
    if not (root / "imagenet-c").is_dir():
        _check_frost(config)  # before the first part is built, not minutes later at ImageNet-C
    steps = {"train": 1, "val": 1, "val-masks": 1, "imagenet-c": 5 * len(config.corruptions or CORRUPTIONS),
             "imagenet-p": len(config.perturbations or PERTURBATION_SUBSETS["common"]),
             "imagenet-9": 1, "imagenet-r": 1}
    builders = {
        "train": lambda d, p: build_split(d, config, "train"),
        "val": lambda d, p: build_split(d, config, "val"),
        "val-masks": lambda d, p: build_masks(d, config),
        "imagenet-c": lambda d, p: build_imagenet_c(d, config, progress=p),
        "imagenet-p": lambda d, p: build_imagenet_p(d, config, progress=p),
        "imagenet-9": lambda d, p: build_imagenet_9(d, config),
        "imagenet-r": lambda d, p: build_imagenet_r(d, config),
    }
    out = {}
    bar = None
    for part, builder in builders.items():
        def build(folder, part=part, builder=builder):
            nonlocal bar
            if bar is None:
                bar = tqdm(total=sum(steps.values()), desc="synthetic benchmark", unit="step", leave=False,
                           disable=not progress)
            bar.set_postfix_str(part)
            builder(folder, lambda n: bar.update(n))
            if steps[part] == 1:
                bar.update(1)

        out[part] = ensure_entry(root / part, build, corrupted_key if part in ("imagenet-c", "imagenet-p") else key,
                                 log=log)
    if bar is not None:
        bar.close()
    return out


def reference_predictions(model, images: np.ndarray, mean, std, batch_size: int = 256):
    """(predicted class, confidence) of ``model`` on uint8 (N, H, W, 3) ``images``, normalised with
    ``mean``/``std``; the model runs in eval mode without gradients."""
    import torch

    model.eval()
    preds, confs = [], []
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = (_to_tensor(images[i:i + batch_size]) - mean_t) / std_t
            prob = model(x).softmax(-1)
            conf, pred = prob.max(-1)
            preds.append(pred.numpy()), confs.append(conf.numpy())
    return np.concatenate(preds), np.concatenate(confs)


def build_imagenet_a(root, config: SyntheticConfig, model, mean, std) -> int:
    """ImageNet-A layout: root/<true class>/*.png, the images of a hard pool (small shapes, each on
    another class's own background) that ``model`` misclassifies with confidence at least
    ``config.a_min_confidence``. Returns how many were kept (each class keeps at least one if
    any of its pool images is misclassified, the most confident first)."""
    pool = render(CLASSES, config.seed, "a-pool", config.a_pool_per_class, config.size,
                  background_from="other", scale_range=(0.35, 0.6))
    pred, conf = reference_predictions(model, pool.images, mean, std)
    wrong = pred != pool.labels
    keep = wrong & (conf >= config.a_min_confidence)
    for c in range(len(CLASSES)):  # a class with no confident mistake keeps its most confident one
        members = np.flatnonzero((pool.labels == c) & wrong)
        if len(members) and not keep[members].any():
            keep[members[np.argmax(conf[members])]] = True
    idx = np.flatnonzero(keep)
    _write_folder(Path(root), pool.images[idx], pool.labels[idx], None, stem="a")
    record = {"reference_predictions": pred[idx].tolist(), "reference_confidence": conf[idx].round(4).tolist(),
              "labels": pool.labels[idx].tolist(), "pool_size": int(len(pool.labels)),
              "min_confidence": config.a_min_confidence}
    (Path(root) / "selection.json").write_text(json.dumps(record))
    return int(len(idx))


def build_imagenet_o(root, config: SyntheticConfig, model, mean, std) -> None:
    """ImageNet-O layout: root/<class>/<held-out shape>_<k>.png. Images show only held-out shapes;
    as in ImageNet-O, each sits in the folder of the training class ``model`` predicts for it (the
    folder names only define the in-distribution class subset; the eval scores them as anomalies)."""
    data = render(OOD_CLASSES, config.seed, "ood", config.ood_per_class, config.size,
                  background_correlation=config.background_correlation)
    pred, _ = reference_predictions(model, data.images, mean, std)
    counters: Dict[tuple, int] = {}
    for image, label, p in zip(data.images, data.labels, pred):
        shape = OOD_CLASSES[int(label)]
        k = counters.get((shape,), 0)
        counters[(shape,)] = k + 1
        folder = Path(root) / CLASSES[int(p)]
        folder.mkdir(parents=True, exist_ok=True)
        _save_png(folder / f"{shape}_{k:05d}.png", image)


__all__ = ["CLASSES", "OOD_CLASSES", "IN9_CLASSES", "IN9_FOLDERS", "IN9_VARIANTS", "SHAPES", "SyntheticConfig", "Rendered", "render", "render_one",
           "composite", "imagenet9_variants", "class_space", "build_base", "build_split", "build_masks",
           "build_imagenet_c", "build_imagenet_p", "build_imagenet_9", "build_imagenet_r", "build_imagenet_a",
           "build_imagenet_o", "reference_predictions"]

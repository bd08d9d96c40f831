"""Render a folder of images into the official ImageNet-C / ImageNet-P layouts.

    SRC/<wnid>/<image>.JPEG   (ImageNet-val sorted into class folders; PNG/JPEG/BMP/WebP accepted)
      -> ImageNet-C: DST/<corruption>/<severity>/<wnid>/<image>.JPEG   224x224, JPEG quality 85
      -> ImageNet-P: DST/<perturbation>/<wnid>/<image>.mp4              224x224 frames, H.264
         (noise sequences also at difficulty 2 and 3, as DST/gaussian_noise_2/..., like the release)

Preprocessing as in the release: resize the short side to 256 (bilinear, Pillow), centre crop
224; corrupted pixels are truncated to 8 bits (the release's np.uint8). ImageNet-P frames are
computed on the central 256x256 of the resized image and cropped to 224, so translations,
rotations, tilts and zoom-outs show real surroundings.

Resumable: a file is written under a temporary name and renamed when complete; files already
present are skipped. Each batch of images ("chunk": up to batch_size consecutive files of one
class, in sorted order) uses its own generator seeded from (seed, name, level, wnid, chunk index),
so a resumed run writes exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from . import CORRUPTIONS, PERTURBATIONS, _filters, corrupt, perturbation_sequence
from .perturb import NOISE_PERTURBATIONS

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
RESIZE = 256
CROP = 224
JPEG_QUALITY = 85


def list_images(src) -> List[Tuple[str, List[Path]]]:
    """[(wnid, sorted image paths)] of an ImageNet-val-style folder; ValueError if it is not one."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"source folder {str(src)!r} does not exist or is not a folder; expected the "
                         "ImageNet-val layout SRC/<wnid>/<image>.JPEG")
    classes = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes.append((folder.name, files))
    if not classes:
        loose = [p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES][:3]
        hint = (f" It holds images directly ({', '.join(loose)}, ...): move them into one folder per class "
                "(e.g. ImageNet's valprep.sh does this for ILSVRC2012 val)." if loose else "")
        raise ValueError(f"no class folders with images in {str(src)!r}; expected SRC/<wnid>/<image>.JPEG "
                         f"(images with suffix {', '.join(IMAGE_SUFFIXES)}).{hint}")
    return classes


def load_image(path: Path, crop: Optional[int] = CROP) -> torch.Tensor:
    """(3, crop, crop) float image in [0, 1]: short side resized to 256 with Pillow's bilinear
    filter (torchvision's Resize(256) on a PIL image), then centre-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            size = (RESIZE, int(RESIZE * h / w))
        else:
            size = (int(RESIZE * w / h), RESIZE)
        im = im.resize(size, Image.BILINEAR)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    image = data.permute(2, 0, 1).float() / 255
    return _filters.center_crop(image, (crop, crop) if crop else (RESIZE, RESIZE))


def chunk_seed(seed: int, name: str, level: int, wnid: str, chunk: int) -> int:
    key = f"{seed}/{name}/{level}/{wnid}/{chunk}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def chunk_generator(seed: int, name: str, level: int, wnid: str, chunk: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(chunk_seed(seed, name, level, wnid, chunk))
    return g


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x.clamp(0, 1) * 255).to(torch.uint8)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def encode_mp4(frames: torch.Tensor, noisy: bool, preset: str = "medium") -> bytes:
    """(T, 3, H, W) uint8 frames -> H.264 mp4 bytes at 1 frame/s, as the release's ffmpeg call
    (libx264, crf 20; noise sequences '-tune grain' at the default crf 23; RGB input becomes
    yuv444p, as ffmpeg picks for PNG frames)."""
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.height, stream.width = frames.shape[-2:]
        stream.pix_fmt = "yuv444p"
        stream.options = {"preset": preset, **({"tune": "grain"} if noisy else {"crf": "20"})}
        for frame in frames.permute(0, 2, 3, 1).contiguous().numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def read_mp4(path) -> torch.Tensor:
    """Frames of an mp4 as (T, 3, H, W) uint8."""
    import av

    with av.open(str(path)) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    return torch.stack(frames).permute(0, 3, 1, 2)


def _jobs(benchmark: str, names: Sequence[str], levels: Sequence[int]) -> List[Tuple[str, int, str]]:
    """(name, level, output folder name) for every requested rendering."""
    if benchmark == "c":
        return [(n, s, f"{n}/{s}") for n in names for s in levels]
    jobs = []
    for n in names:
        for d in (levels if n in NOISE_PERTURBATIONS else (1,)):
            jobs.append((n, d, n if d == 1 else f"{n}_{d}"))
    return jobs


def render(src, dst, benchmark: str = "c", names: Optional[Iterable[str]] = None,
           levels: Optional[Iterable[int]] = None, batch_size: int = 32, seed: int = 0,
           device: str = "cpu", preset: str = "medium", progress: bool = True) -> int:
    """Render SRC into DST (see the module docstring). ``names`` default to all 19 corruptions or
    all 10 perturbations; ``levels`` are severities (C, default 1..5) or noise difficulties
    (P, default 1..3). Returns the number of files written."""
    from tqdm.auto import tqdm

    if benchmark not in ("c", "p"):
        raise ValueError(f"benchmark must be 'c' (ImageNet-C) or 'p' (ImageNet-P); got {benchmark!r}")
    valid = tuple(CORRUPTIONS) if benchmark == "c" else tuple(PERTURBATIONS)
    names = list(valid if names is None else names)
    for n in names:
        if n not in valid:
            raise ValueError(f"unknown {'corruption' if benchmark == 'c' else 'perturbation'} {n!r}; "
                             f"valid names are: {', '.join(valid)}")
    levels = list(levels if levels is not None else ((1, 2, 3, 4, 5) if benchmark == "c" else (1, 2, 3)))
    top = 5 if benchmark == "c" else 3
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= top:
            raise ValueError(f"{'severities' if benchmark == 'c' else 'difficulties'} must be integers in 1..{top}; got {level!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    classes = list_images(src)
    dst = Path(dst)
    jobs = _jobs(benchmark, names, levels)
    suffix = ".JPEG" if benchmark == "c" else ".mp4"
    total = sum(len(files) for _, files in classes) * len(jobs)
    written = 0
    with tqdm(total=total, disable=not progress, unit="file",
              desc=f"ImageNet-{benchmark.upper()} -> {dst}") as bar:
        for wnid, files in classes:
            for chunk, start in enumerate(range(0, len(files), batch_size)):
                paths = files[start:start + batch_size]
                images = None
                for name, level, folder in jobs:
                    targets = [dst / folder / wnid / (p.stem + suffix) for p in paths]
                    todo = [i for i, t in enumerate(targets) if not t.exists()]
                    if todo:
                        if images is None:
                            crop = CROP if benchmark == "c" else None
                            images = torch.stack([load_image(p, crop) for p in paths]).to(device)
                        generator = chunk_generator(seed, name, level, wnid, chunk, device)
                        if benchmark == "c":
                            out = to_uint8(corrupt(images, name, level, generator)).cpu()
                            for i in todo:
                                data = _encode_jpeg(out[i])
                                _write_atomic(targets[i], data)
                        else:
                            frames = to_uint8(perturbation_sequence(images, name, level, generator, crop=CROP)).cpu()
                            for i in todo:
                                _write_atomic(targets[i], encode_mp4(frames[i], name in NOISE_PERTURBATIONS, preset))
                        written += len(todo)
                    bar.update(len(paths))
    return written


def _encode_jpeg(image: torch.Tensor) -> bytes:
    import warnings

    from torchvision.io import encode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 flags its codecs as moving to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return encode_jpeg(image, quality=JPEG_QUALITY).numpy().tobytes()

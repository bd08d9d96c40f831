"""Image and video file input/output: list and decode images, encode JPEG, PNG, H.264 mp4 and .npy
frames, read mp4, write files atomically (``write_atomic(path, data)`` and ``temporary_files(folder)`` are
lkfast.tables' one writer, for bytes, and what it leaves when killed).

    >>> from lkfast.data.io import list_images, load_image, read_mp4
    >>> for wnid, paths in list_images("/data/imagenet/val"):       # [(class folder, sorted paths)]
    ...     x = load_image(paths[0], resize=256, crop=224)          # (3, 224, 224) float in [0, 1]
    >>> frames = read_mp4("imagenet-p/rotate/n01440764/x.mp4")      # (T, 3, H, W) uint8

Images are decoded with Pillow (the codec the ImageNet-C release used), videos with PyAV (FFmpeg).
Tensors are channels first; float images are in [0, 1].
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from lkfast.corrupt.utils import center_crop, levels8
from lkfast.tables import temporary_files, write_bytes_atomic as write_atomic  # noqa: F401 (re-exported)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4",)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
"""libx264's presets, fastest first (``encode_mp4``'s ``preset``)."""

PathLike = Union[str, os.PathLike]


def is_hidden(path: PathLike) -> bool:
    """Hidden files and folders (macOS's ``._name`` copies among them), the __MACOSX folder of a zip
    made on macOS and the @eaDir folders a Synology NAS adds: never data, for the readers and the
    writer alike."""
    name = Path(path).name
    return name.startswith(".") or name in ("__MACOSX", "@eaDir")


def files_with_suffix(folder: PathLike, suffixes: Sequence[str], ignored: Optional[list] = None) -> List[Path]:
    """Sorted paths of the files directly in ``folder`` whose suffix is one of ``suffixes`` (any case),
    hidden ones (``is_hidden``) left out; the other files that are not hidden are appended to
    ``ignored`` where it is given. Sub-folders are not searched."""
    files = []
    for p in Path(folder).iterdir():
        if p.is_file() and not is_hidden(p):
            if p.suffix.lower() in suffixes:
                files.append(p)
            elif ignored is not None:
                ignored.append(p)
    return sorted(files)


def image_files(folder: PathLike) -> List[Path]:
    """Sorted paths of the image files directly in ``folder`` (suffix in IMAGE_SUFFIXES, any case,
    not hidden: ``is_hidden``); [] if there are none. Sub-folders are not searched."""
    return files_with_suffix(folder, IMAGE_SUFFIXES)


def list_images(folder: PathLike) -> List[Tuple[str, List[Path]]]:
    """[(class name, sorted image paths)] of a folder laid out like ImageNet-val sorted into classes,
    ``folder/<class>/<image>``, classes in sorted order; class folders without images, hidden files
    and folders (``is_hidden``) are left out.

    Raises ValueError if ``folder`` is not a folder, or holds no class folder with images (with a
    hint when the images lie directly in it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"source folder {str(folder)!r} does not exist or is not a folder; expected the "
                         "ImageNet-val layout SRC/<wnid>/<image>.JPEG")
    classes = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)):
        files = image_files(sub)
        if files:
            classes.append((sub.name, files))
    if not classes:
        loose = [p.name for p in image_files(folder)][:3]
        hint = (f" It holds images directly ({', '.join(loose)}, ...): move them into one folder per class "
                "(e.g. ImageNet's valprep.sh does this for ILSVRC2012 val)." if loose else "")
        raise ValueError(f"no class folders with images in {str(folder)!r}; expected SRC/<wnid>/<image>.JPEG "
                         f"(images with suffix {', '.join(IMAGE_SUFFIXES)}).{hint}")
    return classes


def rgb(im):
    """A PIL image as 8-bit RGB: grey, palette and alpha images converted (alpha dropped), and 16-bit
    grey ones ("I;16", or "I" as Pillow opens some 16-bit PNGs) scaled to 8 bits first (Pillow's own
    conversion clips them at 255: a nearly white image)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np
        from PIL import Image

        grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def load_image(path: PathLike, resize: Optional[int] = None, crop: Optional[int] = None) -> torch.Tensor:
    """Decode an image file (a path, or a binary file object) as a (3, H, W) float32 RGB tensor in
    [0, 1] (grey, palette and alpha images are converted to RGB, alpha dropped; see ``rgb``).

    resize: if given, the short side is resized to this length with Pillow's bilinear filter, the
    long side to int(resize * long / short) (torchvision's ``Resize(resize)`` on a PIL image).
    crop: if given, the central crop x crop window (torchvision's ``CenterCrop``); ValueError if
    the image is smaller than that. Raises the decoder's error (PIL.UnidentifiedImageError,
    OSError) for files that are not images.
    """
    from PIL import Image

    with Image.open(path) as im:
        im = rgb(im)
        if resize is not None:
            w, h = im.size
            size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            im = im.resize(size, Image.BILINEAR)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    image = data.permute(2, 0, 1).float() / 255
    return center_crop(image, (crop, crop)) if crop is not None else image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 by truncation, floor(x * 255), as the ImageNet-C release's
    ``np.uint8(x)`` stored them (values outside [0, 1] are clipped first; float32 noise just below
    a level is that level: ``lkfast.corrupt.utils.levels8``)."""
    return levels8(x).to(torch.uint8)


def encode_jpeg(image: torch.Tensor, quality: int = 85) -> bytes:
    """JPEG bytes of a (3, H, W) uint8 CPU image (libjpeg through torchvision, 4:2:0 chroma)."""
    from torchvision.io import encode_jpeg as _torchvision_encode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 flags its codecs as moving to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return _torchvision_encode_jpeg(image, quality=quality).numpy().tobytes()


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes (lossless) of a (3, H, W) uint8 CPU image, with Pillow; ``load_image`` reads them
    back from a ``BytesIO``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def check_x264_preset(preset: str) -> None:
    """Raise ValueError naming the valid presets unless ``preset`` is one of libx264's (X264_PRESETS)."""
    if preset not in X264_PRESETS:
        raise ValueError(f"unknown libx264 preset {preset!r}; valid presets are: {', '.join(X264_PRESETS)}")


def encode_mp4(frames: torch.Tensor, noisy: bool = False, preset: str = "veryslow") -> bytes:
    """H.264 mp4 bytes of (T, 3, H, W) uint8 CPU frames at 1 frame/s, as the ImageNet-P release's
    ffmpeg call made them: libx264 '-preset veryslow', crf 20, or for noise sequences (``noisy``)
    '-tune grain' at the default crf 23; RGB input becomes yuv444p, as ffmpeg picks for PNG frames.
    ``preset`` trades speed for size at about the same quality, but not the same losses: measured
    on one 224-px sequence here, "medium" encodes 2.6x (rotate) to 4x (Gaussian noise) faster and
    its decoded noise frames were 3.98 levels from the frames against veryslow's 4.22. ValueError
    for a preset not in X264_PRESETS."""
    check_x264_preset(preset)
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


def encode_npy(frames: torch.Tensor) -> bytes:
    """.npy bytes (lossless, uncompressed) of (T, 3, H, W) uint8 CPU frames, stored as a (T, H, W, 3)
    uint8 array, the layout ImageNet-P's reader (lkfast.data.ImageNetP) takes beside mp4. Unlike
    ``encode_mp4`` the same frames always give the same bytes; a 31-frame 224x224 sequence is 4.67 MB."""
    import numpy as np

    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"encode_npy takes (T, 3, H, W) uint8 frames; got {frames.dtype} {tuple(frames.shape)}")
    buffer = io.BytesIO()
    np.save(buffer, frames.permute(0, 2, 3, 1).contiguous().numpy(), allow_pickle=False)
    return buffer.getvalue()


def read_mp4(path: PathLike, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """All frames of the first video stream of ``path`` as a (T, 3, H, W) RGB tensor: uint8
    (``dtype=torch.uint8``, the default) or a float dtype with values in [0, 1]. Raises ValueError
    if the file holds no video frame, and PyAV's error (av.error.InvalidDataError, ...) if it is
    not a readable video."""
    import av

    with av.open(str(path)) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{str(path)!r} holds no video frames")
    video = torch.stack(frames).permute(0, 3, 1, 2).contiguous()
    if dtype == torch.uint8:
        return video
    if not dtype.is_floating_point:
        raise ValueError(f"read_mp4 returns uint8 or a float dtype in [0, 1]; got dtype {dtype}")
    return video.to(dtype) / 255


def is_complete(path: PathLike) -> bool:
    """Whether ``path`` exists and holds a whole file of its kind, judged by its structure without
    decoding: a JPEG (.jpeg/.jpg) must start with the SOI marker and end with the EOI marker; an
    mp4 must be a chain of top-level boxes that ends exactly at the end of the file and contains
    the 'moov' box (which H.264 writers put last); an .npy file must be as long as its header's
    shape and dtype say. Other files only need to exist and be non-empty. A file cut short by a
    killed copy or write fails the check."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size == 0:
        return False
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        if suffix in (".jpeg", ".jpg"):
            if size < 4:  # (seeking 2 bytes back from the end of a 1-byte file is an OSError)
                return False
            head = f.read(2)
            f.seek(-2, os.SEEK_END)
            return head == b"\xff\xd8" and f.read(2) == b"\xff\xd9"
        if suffix == ".mp4":
            return _mp4_boxes_complete(f, size)
        if suffix == ".npy":
            return _npy_complete(f, size)
    return True


def _npy_complete(f, size: int) -> bool:
    # header (magic, version, a dict literal with dtype, order and shape), then the data, nothing after
    import numpy as np
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
    except (ValueError, OSError, EOFError):
        return False
    if dtype.hasobject:
        return False
    return f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize == size


def _mp4_boxes_complete(f, size: int) -> bool:
    # ISO base media file: boxes of (32-bit size, 4-char type[, 64-bit size if size == 1]);
    # size 0 means "to the end of the file"
    offset, seen_moov = 0, False
    while offset < size:
        f.seek(offset)
        header = f.read(8)
        if len(header) < 8:
            return False
        box_size, box_type = int.from_bytes(header[:4], "big"), header[4:]
        if box_size == 1:
            large = f.read(8)
            if len(large) < 8:
                return False
            box_size = int.from_bytes(large, "big")
        elif box_size == 0:
            box_size = size - offset
        if box_size < 8:
            return False
        seen_moov |= box_type == b"moov"
        offset += box_size
    return offset == size and seen_moov


__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "image_files", "list_images", "load_image", "to_uint8",
           "encode_jpeg", "encode_mp4", "encode_npy", "read_mp4", "write_atomic", "temporary_files",
           "is_complete"]

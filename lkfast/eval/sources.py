"""Where the benchmark data lives, and the data loader the evaluation loop reads it with.

``--data-root DIR`` expects these sub-folders (any subset; a task whose folder is absent is
skipped and the report says so), each in the benchmark's official layout:

    DIR/val/<wnid>/*.JPEG                          ImageNet-val (clean; ImageNet-O's in-distribution set;
                                                   the source of generated ImageNet-C/-P)
    DIR/imagenet-a/<wnid>/*.jpg                    ImageNet-A (200 wnids)
    DIR/imagenet-r/<wnid>/*.jpg                    ImageNet-R (200 wnids)
    DIR/imagenet-o/<wnid>/*.jpg                    ImageNet-O (200 wnids)
    DIR/imagenet-c/<corruption>/<1..5>/<wnid>/*.JPEG
    DIR/imagenet-p/<perturbation>/<wnid>/*.mp4     (or .npy sequences)
    DIR/imagenet-9/<variant>/val/<class>/*         (backgrounds challenge: original, mixed_same, ...)

``--<name>-dir`` (e.g. ``--imagenet-a-dir``, ``--val-dir``) points at one of them directly and wins
over ``--data-root``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

SOURCE_NAMES = ("val", "imagenet-a", "imagenet-r", "imagenet-o", "imagenet-c", "imagenet-p", "imagenet-9")


def source_label(key: str) -> str:
    """How errors about a source's folders name it: its reader's name ("ImageNet-A"), else the key."""
    from lkfast import data

    readers = {"val": data.ImageNetVal, "imagenet-a": data.ImageNetA, "imagenet-r": data.ImageNetR,
               "imagenet-o": data.ImageNetO, "imagenet-c": data.ImageNetC, "imagenet-p": data.ImageNetP,
               "imagenet-9": data.ImageNet9}
    return readers[key].name if key in readers else {"masks": "the occlusion's masks"}.get(key, key)


def resolve_sources(data_root: Optional[str], dirs: Dict[str, Optional[str]]) -> Dict[str, str]:
    """Source name -> folder: ``dirs`` (from ``--<name>-dir``) first, then ``data_root/<name>`` where
    that folder exists. Raises FileNotFoundError for a ``--data-root`` or ``--<name>-dir`` that is
    not a folder (naming the option)."""
    sources: Dict[str, str] = {}
    if data_root is not None:
        root = Path(data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root {data_root}: no such folder")
        for name in SOURCE_NAMES:
            if (root / name).is_dir():
                sources[name] = str(root / name)
    for name, path in dirs.items():
        if path is None:
            continue
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--{name}-dir {path}: no such folder (expected the {name} dataset folder)")
        sources[name] = str(path)
    return sources


def _collate(batch):
    from lkfast.data import collate_skipping

    kept = [(x, t) for x, t in batch if x is not None]
    mixed = mixed_sizes([x for x, _ in kept], [t[1] for _, t in kept])  # t: (target, dataset index)
    if mixed:  # the main process raises it, naming the files (a worker's exception would carry its traceback)
        return mixed, torch.tensor([t for _, t in kept]), len(batch) - len(kept)
    return collate_skipping(batch)


class MixedSizes(tuple):
    """What a batch of images of different sizes collates to: (first index, its size, odd index, its size)."""


def mixed_sizes(images: Sequence[torch.Tensor], indices: Sequence[int]) -> Optional[MixedSizes]:
    """None when the images share one size (H, W), else the first and the first other one."""
    sizes = [tuple(x.shape[-2:]) for x in images]
    odd = next((k for k, size in enumerate(sizes) if size != sizes[0]), None)
    return None if odd is None else MixedSizes((indices[0], sizes[0], indices[odd], sizes[odd]))


def mixed_sizes_error(dataset, mixed: MixedSizes) -> ValueError:
    """The error for images of different sizes fed as they are (ImageNet-C, -9: no resize), naming two files."""
    from lkfast.data.imagenet import DatasetLayoutError

    samples = getattr(dataset, "samples", None)
    first, (h, w), odd, (oh, ow) = mixed

    def name(index):
        return str(samples[index][0]) if samples is not None else f"item {index}"
    return DatasetLayoutError(
        f"{name(odd)} is {oh}x{ow} but {name(first)} is {h}x{w}: this benchmark's images are fed to the model as "
        f"they are, without a resize (the release's are all 224x224), so they must share one size; render or "
        f"resize them to one size (python -m lkfast.corrupt renders ImageNet-C and ImageNet-P at 224x224)")


JPEG_SUFFIXES = (".jpg", ".jpeg")


class EncodedImages(torch.utils.data.Dataset):
    """The JPEG files of an image-folder dataset as raw bytes, decoded a batch at a time on the
    evaluation device (``torchvision.io.decode_jpeg(device="cuda")``) and resized / centre-cropped
    there as timm's eval transform does (``resize``: shorter side to floor(size / crop_pct), then
    the centre crop; ``resize=False``: fed as they are). Workers only read files.

    dataset: a ``lkfast.data.ImageFolderBenchmark`` (needs ``samples``); config: the model's data
    config. Items are (uint8 1-D tensor of file bytes or None if unreadable, target)."""

    def __init__(self, dataset, config, resize: bool = True):
        self.dataset, self.samples, self.root = dataset, dataset.samples, getattr(dataset, "root", "")
        self.resize = resize
        size = config["input_size"][-2:]
        self.crop = tuple(int(s) for s in size)
        self.scale = int(min(size) / float(config.get("crop_pct") or 0.875)) if resize else None
        from torchvision.transforms import InterpolationMode

        self.interpolation = InterpolationMode(config.get("interpolation", "bilinear"))

    @staticmethod
    def supports(dataset, config) -> bool:
        """True when every file is a JPEG and the config's crop mode is the centre crop."""
        samples = getattr(dataset, "samples", None)
        return bool(samples) and config.get("crop_mode", "center") == "center" and \
            all(str(p).lower().endswith(JPEG_SUFFIXES) for p, _ in samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from torchvision.io import read_file

        path, target = self.samples[index]
        try:
            return read_file(str(path)), target
        except (OSError, RuntimeError):
            return None, target

    @staticmethod
    def collate(batch):
        kept = [(x, t) for x, t in batch if x is not None]
        return [x for x, _ in kept], torch.tensor([t for _, t in kept], dtype=torch.long), len(batch) - len(kept)

    def decode_batch(self, encoded: List[torch.Tensor], device: str, indices: Optional[Sequence[int]] = None):
        """(images float (N, 3, h, w) in [0, 1] on ``device``, bool mask of the decodable items);
        DatasetLayoutError, naming two files (``indices``: the items' dataset indices), for images of
        different sizes fed without a resize."""
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        from lkfast.eval.runner import out_of_memory

        def device_fault(error: RuntimeError) -> bool:
            # the device's trouble, not the file's (torch.cuda.OutOfMemoryError is a RuntimeError too):
            # raised, not counted as undecodable images (a smaller result, cached as if complete)
            return out_of_memory(error) or "CUDA error" in str(error)

        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            ok = [True] * len(encoded)
        except RuntimeError as error:  # one bad file fails the batch: decode one by one to find it
            if device_fault(error):
                raise
            decoded, ok = [], []
            for data in encoded:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                    ok.append(True)
                except RuntimeError as error:
                    if device_fault(error):
                        raise
                    ok.append(False)
        images = []
        for image in decoded:
            if self.resize:
                image = F.resize(image, self.scale, interpolation=self.interpolation, antialias=True)
                image = F.center_crop(image, list(self.crop))
            images.append(image)
        if not images:
            return None, torch.tensor(ok)
        kept = [i for i, good in zip(indices if indices is not None else range(len(ok)), ok) if good]
        mixed = mixed_sizes(images, kept)
        if mixed:
            raise mixed_sizes_error(self, mixed)
        return torch.stack(images).float().div_(255), torch.tensor(ok)


class _Indexed(torch.utils.data.Dataset):
    """``dataset``'s items as (image, (target, index)): the collate functions stack the pairs, so each
    batch says which dataset indices it kept after dropping unreadable items."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return image, (target, index)


def loader_for(dataset, batches: Sequence[List[int]], options, device: str):
    """Yield (images, targets, indices, n_skipped) for the given index batches: indices is the list
    of the dataset indices of the items kept (unreadable ones are dropped and counted in n_skipped).
    Decodes in ``--workers`` processes (in this one when there is a single batch), with pinned memory
    when evaluating on CUDA (``EncodedImages`` yield lists of file bytes instead, decoded by
    ``decode_batch``)."""
    loader = _data_loader(dataset, batches, options, device)
    for images, pairs, skipped in loader:
        if isinstance(images, MixedSizes):
            raise mixed_sizes_error(dataset, images)
        pairs = pairs.view(-1, 2)
        yield images, pairs[:, 0].clone(), pairs[:, 1].tolist(), skipped


def _data_loader(dataset, batches: Sequence[List[int]], options, device: str) -> DataLoader:
    batches = list(batches)
    # Worker processes are forked from this one on Linux before Python 3.14 (there each costs a fork and
    # a copy-on-write page fault for every page this process then writes while they live; Python 3.14's
    # forkserver and macOS's spawn start each one afresh instead, importing lkfast and torch, seconds
    # each). Either way they pay off only by decoding later batches while
    # the model runs; a loader of one batch has nothing to overlap (measured on the embedded default,
    # whose ImageNet-C folders are one batch each: 9.7M page faults and 112 s with 2 workers, 26 s
    # decoding in the main process).
    workers = max(0, int(options.workers)) if len(batches) > 1 else 0
    collate = EncodedImages.collate if isinstance(dataset, EncodedImages) else _collate
    return DataLoader(_Indexed(dataset), batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=device.startswith("cuda") and torch.cuda.is_available()
                      and not isinstance(dataset, EncodedImages),
                      prefetch_factor=4 if workers else None, persistent_workers=False)

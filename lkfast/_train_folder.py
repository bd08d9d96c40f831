"""lkfast.train's dataset class: torchvision's ImageFolder with a given class order, each item's
augmentation drawn from (seed, epoch, index) and an unreadable image returned as ``_Unreadable``.

A module of its own, imported by ``lkfast.train._dataset`` when a dataset is made, so that importing
lkfast.train does not import torchvision; the class is defined at module level so that loader
workers started by "spawn" (macOS, Windows) or "forkserver" (Python 3.14's default on Linux) can
unpickle the dataset (a class made inside a function cannot be).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from torchvision.datasets import ImageFolder

from lkfast.train import TrainError, _SeededDraws, _Unreadable, _val_optional


class OrderedImageFolder(ImageFolder):
    augment_key = None  # (seed, epoch): each item's transform draws from (seed, epoch, index) alone

    def __init__(self, root: str, transform, classes, split: str):
        self.ordered_classes, self.split = list(classes), split  # find_classes, called by __init__, reads them
        super().__init__(root, transform=transform)

    def find_classes(self, directory):
        classes, folder = self.ordered_classes, Path(self.root)
        missing = [c for c in classes if not (Path(directory) / c).is_dir()]
        if missing and self.split == "val":
            raise TrainError(f"{directory} lacks a folder for the class(es) {', '.join(missing)} of "
                             f"{folder.parent / 'train'}: add one holding its validation images, "
                             f"{_val_optional(folder)}")
        if missing:
            raise TrainError(f"--classes names folders missing from {directory}: {', '.join(missing)}")
        return list(classes), {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index):
        from PIL import Image

        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # truncated,
            # not an image (UnidentifiedImageError is an OSError), a read error of the disk
            if isinstance(error, Image.UnidentifiedImageError):  # its text names the file object
                return _Unreadable(path, "PIL cannot identify it as an image")
            return _Unreadable(path, f"{type(error).__name__}: {error}")
        if self.transform is not None:
            key = self.augment_key
            with _SeededDraws((*key, index)) if key is not None else contextlib.nullcontext():
                sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

"""Readers for the robustness benchmarks' official on-disk layouts, each a torch Dataset.

    >>> from lkfast.data import ImageNetA, ImageNetC, ImageNetP, collate_skipping, transform_for
    >>> tf = transform_for(timm.data.resolve_data_config({}, model=model))   # resize, crop, [0, 1]
    >>> a = ImageNetA("/data/imagenet-a", transform=tf)          # targets: ImageNet-1k indices
    >>> loader = DataLoader(a, batch_size=64, collate_fn=collate_skipping)
    >>> for images, targets, n_skipped in loader:
    ...     top1 = lkfast.metrics.accuracy(model(norm(images)), targets, a.class_subset)
    >>> c = ImageNetC("/data/imagenet-c", "snow", 3, transform=transform_for(cfg, resize=False))

Layouts (the releases' own):
  ImageNet-val, -A, -R, -O   ``<root>/<wnid>/<image>``
  ImageNet-C                 ``<root>/<corruption>/<severity 1..5>/<wnid>/<image>.JPEG``
  ImageNet-P                 ``<root>/<perturbation>[_<difficulty 2|3>]/<wnid>/<sequence>.mp4|.npy``
  ImageNet-9                 ``<root>/<variant>/val/<NN_class>/<image>`` (00_dog .. 08_fish; or class names, wnids)

Items are ``(image, target)``: ``transform`` receives a PIL RGB image (a uint8 (T, 3, H, W)
tensor for ImageNet-P) and must return a float tensor in [0, 1]; no normalisation happens here
(the evaluation puts the model's mean/std inside the model, so attacks and occlusion work in
[0, 1] pixel space). Without a transform an image becomes a (3, H, W) float tensor in [0, 1].
Targets are ImageNet-1k class indices (0..999) for every reader except ImageNet-9 (0..8); ImageNet-A,
-R and -O carry ``class_subset``, the 1k indices of their 200 classes, for ``lkfast.metrics.accuracy``.

Items are in a deterministic order (class folders sorted, then file names sorted); ``limit=N``
keeps the first N, ``limit=N, spread=True`` N evenly spaced ones (each class keeps its share). An
image or video that cannot be decoded gives ``(None, target)`` and a warning naming the file;
:func:`collate_skipping` drops such items and counts them, so the count can be reported (never a
silent wrong score). A folder that does not match its layout raises
:class:`DatasetLayoutError` saying which layout was expected and what was found.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import pkgutil
import re
import warnings
from pathlib import Path
from typing import Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from lkfast import metrics
from lkfast.data.io import IMAGE_SUFFIXES, files_with_suffix, image_files, is_hidden, read_mp4, rgb

PathLike = Union[str, os.PathLike]

IMAGENET9_CLASSES = ("dog", "bird", "vehicle", "reptile", "carnivore", "insect", "instrument", "primate", "fish")
"""ImageNet-9's classes in target order (the release's in9_classes.txt)."""
IMAGENET9_WNIDS = ("n02084071", "n01503061", "n04576211", "n01661091", "n02075296", "n02159955",
                   "n03800933", "n02469914", "n02512053")
"""The WordNet ids of ImageNet-9's classes, in target order (the release's in9_classes.txt)."""
SEQUENCE_SUFFIXES = (".mp4", ".npy")


def looks_like_wnids(names: Sequence[str]) -> bool:
    """True when every name is a WordNet id (``n`` and 8 digits), as ImageNet's class folders are."""
    return bool(names) and all(re.fullmatch(r"n\d{8}", name) for name in names)


class DatasetLayoutError(ValueError):
    """A dataset folder is missing or is not laid out as its benchmark's release: the message says
    which layout was expected, what was found, and what to do."""


# ----------------------------------------------------------------------------- class lists

def _timm_info(name: str) -> List[str]:
    # timm ships ImageNet's class lists as package data (timm/data/_info/*.txt)
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    if data is None:
        raise RuntimeError(f"timm does not ship _info/{name}; timm >= 1.0 is required")
    return data.decode("utf-8").split()


def imagenet_classes() -> List[str]:
    """The 1000 ImageNet-1k wnids in class-index order (timm.data.ImageNetInfo's synsets)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


@functools.lru_cache(maxsize=1)
def _imagenet_class_index() -> Dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_classes())}


def _class_index() -> Dict[str, int]:
    return dict(_imagenet_class_index())


def imagenet_a_indices() -> torch.Tensor:
    """LongTensor of the ImageNet-1k indices of ImageNet-A's 200 classes, ascending (timm's
    imagenet_a_indices.txt)."""
    return torch.tensor([int(i) for i in _timm_info("imagenet_a_indices.txt")], dtype=torch.long)


def imagenet_r_indices() -> torch.Tensor:
    """LongTensor of the ImageNet-1k indices of ImageNet-R's 200 classes, ascending (timm's
    imagenet_r_indices.txt)."""
    return torch.tensor([int(i) for i in _timm_info("imagenet_r_indices.txt")], dtype=torch.long)


def imagenet_a_wnids() -> List[str]:
    """The wnids of ImageNet-A's 200 classes (its folder names), in 1k-index order."""
    return _timm_info("imagenet_a_synsets.txt")


def imagenet_r_wnids() -> List[str]:
    """The wnids of ImageNet-R's 200 classes (its folder names), in 1k-index order."""
    return _timm_info("imagenet_r_synsets.txt")


def imagenet_o_wnids(root: PathLike) -> List[str]:
    """The wnids of ImageNet-O's classes, read from the dataset itself: its class folders, sorted.

    timm ships no ImageNet-O class list; the release's 200 folders ARE its classes (ImageNet-1k
    wnids), and ImageNet-O is scored on those 200 logits. A partial copy gives fewer classes.
    Raises DatasetLayoutError if ``root`` is missing, has no class folder with images, or holds a
    folder that is not an ImageNet-1k wnid."""
    return _scan(root, "ImageNet-O", "<root>/<wnid>/<image>", _class_index())[1]


def imagenet_o_indices(root: PathLike) -> torch.Tensor:
    """LongTensor of the ImageNet-1k indices of the ImageNet-O classes found under ``root``
    (:func:`imagenet_o_wnids`), ascending."""
    index = _class_index()
    return torch.tensor(sorted(index[w] for w in imagenet_o_wnids(root)), dtype=torch.long)


def imagenet9_class_map() -> torch.Tensor:
    """The 1000 -> 9 class map of ImageNet-9 as a LongTensor(1000): entry i is the ImageNet-9 class
    (0..8, see IMAGENET9_CLASSES) of ImageNet-1k class i, or -1 for the 630 classes outside the nine.

    It is the backgrounds-challenge release's ``in_to_in9.json`` (Xiao et al., "Noise or Signal:
    The Role of Image Backgrounds in Object Recognition", ICLR 2021; github.com/MadryLab/
    backgrounds_challenge), shipped unchanged as ``lkfast/data/in_to_in9.json`` (taken byte for byte
    from the copy that bytedance/ibot vendors from that repository, analysis/backgrounds_challenge/;
    its class counts, 116/52/42/36/35/27/26/20/16 and 630 unmapped, are the release's)."""
    return _release_class_map().clone()


@functools.lru_cache(maxsize=1)
def _release_class_map() -> torch.Tensor:
    return _load_class_map(json.loads(pkgutil.get_data("lkfast.data", "in_to_in9.json").decode("utf-8")),
                           "lkfast/data/in_to_in9.json")


def _load_class_map(raw, where: str) -> torch.Tensor:
    if not isinstance(raw, dict):
        raise DatasetLayoutError(f"{where} must be a JSON object {{\"<1k index>\": <0..8 or -1>}}; got {type(raw).__name__}")
    table = torch.full((1000,), -2, dtype=torch.long)
    for key, value in raw.items():
        try:
            k, v = int(key), int(value)
        except (TypeError, ValueError):
            raise DatasetLayoutError(f"{where}: entry {key!r}: {value!r} is not an integer pair") from None
        if not 0 <= k < 1000 or not -1 <= v <= 8:
            raise DatasetLayoutError(f"{where}: entry {key!r}: {value!r} is outside 0..999 -> -1..8")
        table[k] = v
    absent = torch.nonzero(table == -2).flatten().tolist()
    if absent:
        raise DatasetLayoutError(f"{where} has no entry for {len(absent)} ImageNet class(es) (first: {absent[:5]}); "
                                 "it must map all 1000")
    return table


def check_imagenet9_map(root: PathLike) -> bool:
    """Compare the ``in_to_in9.json`` in the ImageNet-9 folder ``root`` (if there is one) with
    :func:`imagenet9_class_map`. Returns True if it is there and equal, False if there is none;
    raises DatasetLayoutError naming the first differing entries if it differs or is malformed."""
    path = Path(root) / "in_to_in9.json"
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetLayoutError(f"cannot read {str(path)!r} as JSON: {error}") from None
    theirs, ours = _load_class_map(raw, str(path)), imagenet9_class_map()
    differ = torch.nonzero(theirs != ours).flatten().tolist()
    if differ:
        shown = ", ".join(f"{i}: {int(theirs[i])} (release: {int(ours[i])})" for i in differ[:5])
        raise DatasetLayoutError(f"{str(path)!r} differs from the backgrounds-challenge release's 1000 -> 9 map at "
                                 f"{len(differ)} ImageNet class(es): {shown}; scores would not be comparable. "
                                 "Use the release's file, or remove this one to use lkfast's copy")
    return True


# ----------------------------------------------------------------------------- folder walking


def _subfolders(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p))


def _require_folder(folder: Path, what: str, layout: str) -> None:
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise DatasetLayoutError(f"{what} folder {str(folder)!r} does not exist (found {found} there); "
                                 f"expected the layout {layout}. Check the path (or the --<task>-dir option)")


def _looks_like(names: List[str]) -> str:
    # a hint when a reader is pointed at another benchmark's folder
    if names and all(n in metrics.IMAGENET_C_ALL or n.rsplit("_", 1)[0] in metrics.IMAGENET_P_ALL
                     or n in metrics.IMAGENET_P_ALL for n in names):
        return (" These look like ImageNet-C corruption (or ImageNet-P perturbation) folders: is this ImageNet-C or -P "
                "(python -m lkfast.eval --imagenet-c-dir / --imagenet-p-dir; lkfast.data.ImageNetC / ImageNetP)?")
    if names and all(n.isdigit() for n in names):
        return " These look like ImageNet-C severity folders: point at the folder above the corruption folders."
    if names and all(n in metrics.IMAGENET9_VARIANTS or n == "val" for n in names):
        return (" These look like ImageNet-9 folders: is this ImageNet-9 (python -m lkfast.eval --imagenet-9-dir; "
                "lkfast.data.ImageNet9(root, variant))?")
    return ""


def _scan(root: PathLike, what: str, layout: str, class_index: Dict[str, int],
          suffixes: Sequence[str] = IMAGE_SUFFIXES, allowed: Optional[Iterable[str]] = None,
          allowed_name: str = "", classes: Optional[Iterable[str]] = None
          ) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(samples [(path, target)] sorted by class folder then file name, class folders used)."""
    root = Path(root)
    _require_folder(root, what, layout)
    folders = _subfolders(root)
    names = [f.name for f in folders]
    if not folders:
        loose = files_with_suffix(root, suffixes)
        found = (f"{len(loose)} file(s) directly in it ({', '.join(p.name for p in loose[:3])}, ...)"
                 if loose else "no class folders")
        val = any(p.name.startswith("ILSVRC2012_val_") for p in loose)  # the val archive as it unpacks
        raise DatasetLayoutError(f"{what}: expected {layout}; found {found} in {str(root)!r}. "
                                 "Put the files into one folder per class"
                                 + (" (ImageNet's val archive unpacks flat: its valprep.sh, or the validation "
                                    "ground truth of the devkit, sorts it into wnid folders)" if val else ""))
    unknown = [n for n in names if n not in class_index]
    if unknown:
        examples = ", ".join(list(class_index)[:2])
        raise DatasetLayoutError(f"{what}: {len(unknown)} of {len(names)} folder(s) in {str(root)!r} are not known class "
                                 f"names: {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}; expected {layout} "
                                 f"with class folders like {examples}.{_looks_like(unknown)}")
    if allowed is not None:
        allowed = set(allowed)
        outside = [n for n in names if n not in allowed]
        if outside:
            raise DatasetLayoutError(f"{what}: folder(s) {', '.join(outside[:5])}{', ...' if len(outside) > 5 else ''} in "
                                     f"{str(root)!r} are not among {allowed_name}; is this the right dataset?")
    if classes is not None:
        wanted = list(dict.fromkeys(classes))
        absent = [c for c in wanted if c not in names]
        if len(absent) == len(wanted):
            raise DatasetLayoutError(f"{what}: none of the {len(wanted)} requested class folders "
                                     f"({', '.join(wanted[:3])}, ...) is in {str(root)!r}")
        if absent:
            warnings.warn(f"{what}: {len(absent)} of the {len(wanted)} requested class folders are not in "
                          f"{str(root)!r} (first: {', '.join(absent[:3])}); using the {len(wanted) - len(absent)} present")
        keep = set(wanted)
        folders = [f for f in folders if f.name in keep]
    samples, used, ignored = [], [], []
    for folder in folders:
        files = files_with_suffix(folder, suffixes, ignored)
        if files:
            used.append(folder.name)
            samples.extend((p, class_index[folder.name]) for p in files)
    if samples and ignored:  # not read, so neither scored nor counted as unreadable: said here
        kinds = sorted({p.suffix.lower() or p.name for p in ignored})
        warnings.warn(f"{what}: {len(ignored)} file(s) in the class folders of {str(root)!r} are not read: their "
                      f"suffixes ({', '.join(kinds[:5])}) are not {', '.join(suffixes)} (first: {ignored[0]}); "
                      f"convert or remove them")
    if not samples:
        others = sorted({p.suffix.lower() or p.name for p in ignored})  # every file there, none read
        found = f"found only {', '.join(others[:5])} files" if others else "they hold no files"
        raise DatasetLayoutError(f"{what}: no files with suffix {', '.join(suffixes)} in the class folders of "
                                 f"{str(root)!r} ({found}); expected {layout}")
    return samples, used


def select_items(samples: list, limit: Optional[int], spread: bool = False) -> list:
    """The first ``limit`` samples, or with ``spread`` the ``limit`` samples at ``floor(i * n / limit)``
    (i = 0 .. limit - 1): evenly spaced over the sorted order, so each class folder keeps its share
    (ImageNet-val's 50 per class and limit 5000: the 1st, 11th, ... 41st of every class)."""
    if limit is None:
        return samples
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer (the number of items to keep) or None for all; got {limit!r}")
    if not spread or limit >= len(samples):
        return samples[:limit]
    return [samples[i * len(samples) // limit] for i in range(limit)]


def to_float_image(x) -> torch.Tensor:
    """A PIL image or a uint8 tensor (..., 3, H, W) -> float32 tensor in [0, 1], channels first; a
    float tensor is returned as it is. The default transform of every reader."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.uint8:
            return x.float() / 255
        if x.dtype.is_floating_point:
            return x
        raise ValueError(f"expected a uint8 or float image tensor; got dtype {x.dtype}")
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(x).float() / 255


def transform_for(data_config: dict, resize: bool = True) -> Callable:
    """The evaluation transform of a model, WITHOUT normalisation: PIL image -> float (3, H, W)
    in [0, 1].

    data_config: timm's resolved data config (``timm.data.resolve_data_config({}, model=model)``):
    ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode`` are used as timm's own eval
    transform uses them (resize to input_size / crop_pct, centre crop; mean/std are ignored: put
    them in the model). resize=False (ImageNet-C and -P, whose 224 x 224 images are fed as they
    are): only the conversion to a float tensor; it also accepts uint8 tensors (ImageNet-P frames).
    """
    if not isinstance(data_config, dict) or "input_size" not in data_config:
        raise ValueError("data_config must be timm's resolved data config (a dict with input_size, interpolation, "
                         "crop_pct, crop_mode); get it with timm.data.resolve_data_config({}, model=model)")
    if not resize:
        return to_float_image
    from timm.data import create_transform
    from torchvision import transforms

    keys = ("input_size", "interpolation", "crop_pct", "crop_mode")
    resize_crop = create_transform(**{k: data_config[k] for k in keys if k in data_config},
                                   is_training=False, normalize=False)
    return transforms.Compose([resize_crop, to_float_image])


def _decode_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return rgb(im)   # decodes the whole file: a truncated one fails here


def _decode_sequence(path: Path) -> torch.Tensor:
    if path.suffix.lower() == ".npy":
        import numpy as np

        array = np.load(path, allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"expected a uint8 array (T, H, W, 3) or (T, 3, H, W); got {array.dtype} {array.shape}")
        frames = torch.from_numpy(array)
        if frames.shape[1] == 3 and frames.shape[-1] != 3:
            return frames.contiguous()
        if frames.shape[-1] == 3:
            return frames.permute(0, 3, 1, 2).contiguous()
        raise ValueError(f"expected a uint8 array (T, H, W, 3) or (T, 3, H, W); got shape {array.shape}")
    return read_mp4(path)


def _sequence_length(path: Path) -> Optional[int]:
    """The frame count a sequence file declares (an .npy header, an mp4 index), without decoding
    it where the file says; None if it cannot be read."""
    try:
        if path.suffix.lower() == ".npy":
            import numpy as np

            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return int(shape[0]) if len(shape) == 4 else None
        import av

        with av.open(str(path)) as container:
            declared = int(container.streams.video[0].frames)
        return declared or int(read_mp4(path).shape[0])
    except Exception:  # an unreadable probe says nothing about the others; it is skipped when read
        return None


class ImageFolderBenchmark(Dataset):
    """Images in ``<root>/<class folder>/<image>``; item = (transform(PIL RGB image), target).

    class_index: folder name -> target (default: ImageNet-1k wnid -> 1k index). A folder that is
    not in it raises DatasetLayoutError listing some of them and what was expected.
    classes: keep only these class folders (e.g. ImageNet-val restricted to ImageNet-O's 200
    classes); a warning if some are absent, an error if all are.
    limit: keep the first N items (sorted by class folder, then file name); N must be >= 1.
    spread: with limit, keep N items evenly spaced over that order instead (every class keeps its
    share: an estimate of the whole set's numbers; the first N of ImageNet-val are its first classes).
    name: how its errors name the folder (e.g. "ImageNet-A"; default "image folder").

    Attributes: ``samples`` [(path, target)], ``targets`` LongTensor, ``classes`` (the class
    folders with files), ``class_subset`` (None here; the 1k indices of the classes for A/R/O).
    """

    name = "image folder"
    layout = "<root>/<class>/<image>"
    class_subset: Optional[torch.Tensor] = None

    def __init__(self, root: PathLike, transform: Optional[Callable] = None,
                 class_index: Optional[Dict[str, int]] = None, limit: Optional[int] = None,
                 classes: Optional[Iterable[str]] = None, name: Optional[str] = None, spread: bool = False):
        self.root = Path(root)
        if name is not None:  # how its errors name the folder (the benchmark it holds)
            self.name = name
        self.transform = transform if transform is not None else to_float_image
        samples, self.classes = self._find(class_index if class_index is not None else _class_index(), classes)
        self.samples = select_items(samples, limit, spread)

    def _find(self, class_index, classes):
        return _scan(self.root, self.name, self.layout, class_index, classes=classes)

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([t for _, t in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, path: Path):
        return _decode_image(path)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            data = self._decode(path)
        except Exception as error:  # any decoder failure: the item is skipped and counted, not fatal
            warnings.warn(f"skipping unreadable file {str(path)!r}: {type(error).__name__}: {error}")
            return None, target
        return self.transform(data), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} items, {len(self.classes)} classes)"


class ImageNetVal(ImageFolderBenchmark):
    """ImageNet-1k validation images sorted into wnid folders (``<root>/<wnid>/<image>``, e.g. by
    ImageNet's valprep.sh); targets are 1k indices. ``classes`` restricts it to some wnids (the
    in-distribution set of ImageNet-O)."""

    name = "ImageNet-val"
    layout = "<root>/<wnid>/<image>.JPEG"

    def __init__(self, root: PathLike, transform: Optional[Callable] = None, limit: Optional[int] = None,
                 classes: Optional[Iterable[str]] = None, spread: bool = False):
        super().__init__(root, transform, limit=limit, classes=classes, spread=spread)


class _SubsetBenchmark(ImageFolderBenchmark):
    subset_name = ""

    def _subset_wnids(self) -> List[str]:
        raise NotImplementedError

    def __init__(self, root: PathLike, transform: Optional[Callable] = None, limit: Optional[int] = None,
                 spread: bool = False):
        super().__init__(root, transform, limit=limit, spread=spread)

    def _find(self, class_index, classes):
        wnids = self._subset_wnids()
        self.class_subset = torch.tensor(sorted(class_index[w] for w in wnids), dtype=torch.long)
        return _scan(self.root, self.name, self.layout, class_index, allowed=wnids,
                     allowed_name=f"{self.name}'s {len(wnids)} classes ({self.subset_name})")


class ImageNetA(_SubsetBenchmark):
    """ImageNet-A (``<root>/<wnid>/<image>``, 200 classes); targets are 1k indices and
    ``class_subset`` holds the 200 1k indices to score on (``accuracy(logits, y, ds.class_subset)``).
    A folder outside the 200 raises DatasetLayoutError."""

    name = "ImageNet-A"
    layout = "<root>/<wnid>/<image>.jpg"
    subset_name = "timm's imagenet_a_synsets.txt"

    def _subset_wnids(self):
        return imagenet_a_wnids()


class ImageNetR(_SubsetBenchmark):
    """ImageNet-R (``<root>/<wnid>/<image>``, 200 classes), as :class:`ImageNetA` with its own 200."""

    name = "ImageNet-R"
    layout = "<root>/<wnid>/<image>.jpg"
    subset_name = "timm's imagenet_r_synsets.txt"

    def _subset_wnids(self):
        return imagenet_r_wnids()


class ImageNetO(ImageFolderBenchmark):
    """ImageNet-O (``<root>/<wnid>/<image>``): anomalies whose folders are 200 ImageNet-1k wnids.
    ``class_subset`` = the 1k indices of the folders present (see :func:`imagenet_o_wnids`): the
    logits to take the max softmax over; ``classes`` = those wnids, for the in-distribution set
    ``ImageNetVal(val_root, classes=o.classes)``. Targets are the folders' 1k indices."""

    name = "ImageNet-O"
    layout = "<root>/<wnid>/<image>.jpg"

    def __init__(self, root: PathLike, transform: Optional[Callable] = None, limit: Optional[int] = None,
                 spread: bool = False):
        super().__init__(root, transform, limit=limit, spread=spread)
        index = _class_index()
        self.class_subset = torch.tensor(sorted(index[w] for w in self.classes), dtype=torch.long)


def _nesting_hint(root: Path, unknown: Sequence[str], known: Collection[str], what: str) -> str:
    """Where a benchmark's ``what`` folders (names in ``known``) are when ``root`` holds the folders
    ``unknown`` instead: one level down (an extra top folder, or the release's per-category archives
    each extracted into a folder of its own), or ``root`` one or two levels too deep (itself one of
    them, or a folder inside one). "" when none of these."""
    holders = [n for n in unknown if any(f.name in known for f in _subfolders(root / n))]
    if len(holders) == 1 and len(unknown) == 1:
        return f" {root / holders[0]} holds the {what} folders: give that folder."
    if holders:
        inside = [f"{n}/{f.name}" for n in holders for f in _subfolders(root / n) if f.name in known]
        return (f" {', '.join(holders[:5])} hold {what} folders ({', '.join(inside[:3])}, ...), as the release's "
                f"archives extract each into a folder of its own: move the {what} folders out of them into {root}.")
    if root.name in known:
        return f" {root} is itself one {what} folder: give the folder holding it, {root.parent}."
    if root.parent.name in known:
        return f" {root} is inside the {what} folder {root.parent.name}: give {root.parent.parent}."
    return ""


def imagenet_c_contents(root: PathLike) -> Dict[str, List[int]]:
    """{corruption: [severities present]} of an ImageNet-C folder, corruptions in the release's
    order, a severity counted when its folder exists. Raises DatasetLayoutError if ``root`` is
    missing, holds a folder that is not a corruption name, or holds no corruption at all."""
    root = Path(root)
    layout = "<root>/<corruption>/<severity 1..5>/<wnid>/<image>.JPEG"
    _require_folder(root, "ImageNet-C", layout)
    names = [f.name for f in _subfolders(root)]
    unknown = [n for n in names if n not in metrics.IMAGENET_C_ALL]
    if unknown:
        hint = _nesting_hint(root, unknown, metrics.IMAGENET_C_ALL, "corruption") or (
            " They look like wnid (class) folders: is this ImageNet-val?" if looks_like_wnids(unknown) else "")
        raise DatasetLayoutError(f"ImageNet-C: folder(s) {', '.join(unknown[:5])} in {str(root)!r} are not corruption names; "
                                 f"expected {layout} with corruptions from: {', '.join(metrics.IMAGENET_C_ALL)}.{hint}")
    contents = {}
    for name in metrics.IMAGENET_C_ALL:
        if name in names:
            contents[name] = [s for s in metrics.SEVERITIES if (root / name / str(s)).is_dir()]
    flat = [n for n, severities in contents.items() if not severities]
    if flat:  # class folders straight under the corruption: left out, that corruption would vanish unnoticed
        held = [f.name for f in _subfolders(root / flat[0])] or [p.name for p in image_files(root / flat[0])]
        raise DatasetLayoutError(f"ImageNet-C: no severity folders (1..5) in {', '.join(flat[:5])} under {str(root)!r} "
                                 f"({flat[0]} holds {', '.join(held[:3]) + (', ...' if len(held) > 3 else '') or 'nothing'}); "
                                 f"expected {layout}: put each severity's class folders in <corruption>/<severity>/")
    if not contents:
        raise DatasetLayoutError(f"ImageNet-C: no corruption folders in {str(root)!r}; expected {layout}")
    for name in contents:  # a severity folder 0 or 6 would be left out, and 1..4 scored as if all were there
        other = sorted(f.name for f in _subfolders(root / name) if f.name not in {str(s) for s in metrics.SEVERITIES})
        if other:
            raise DatasetLayoutError(f"ImageNet-C: {name} under {str(root)!r} holds folder(s) {', '.join(other[:5])}, "
                                     f"not severities; expected {layout}: severities are the folders 1 to 5")
    return contents


class ImageNetC(ImageFolderBenchmark):
    """One corruption at one severity of ImageNet-C: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``
    (224 x 224 images: use ``transform_for(cfg, resize=False)``); targets are 1k indices.
    DatasetLayoutError says which corruptions/severities are present when the one asked for is not."""

    name = "ImageNet-C"
    layout = "<root>/<corruption>/<severity 1..5>/<wnid>/<image>.JPEG"

    def __init__(self, root: PathLike, corruption: str, severity: int, transform: Optional[Callable] = None,
                 limit: Optional[int] = None, spread: bool = False):
        if corruption not in metrics.IMAGENET_C_ALL:
            raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(metrics.IMAGENET_C_ALL)}")
        if isinstance(severity, bool) or severity not in metrics.SEVERITIES:
            raise ValueError(f"severity must be an integer in 1..5; got {severity!r}")
        contents = imagenet_c_contents(root)
        if corruption not in contents:
            raise DatasetLayoutError(f"ImageNet-C: no {corruption!r} folder in {str(root)!r}; found: "
                                     f"{', '.join(contents)}. Expected {self.layout}")
        if severity not in contents[corruption]:
            raise DatasetLayoutError(f"ImageNet-C: no severity folder {str(Path(root) / corruption / str(severity))!r}; "
                                     f"severities found for {corruption}: {contents[corruption] or 'none'}. Expected {self.layout}")
        self.corruption, self.severity = corruption, severity
        super().__init__(Path(root) / corruption / str(severity), transform, limit=limit, spread=spread)


def imagenet_p_contents(root: PathLike) -> Dict[str, List[int]]:
    """{perturbation: [difficulties present]} of an ImageNet-P folder, perturbations in IMAGENET_P_ALL
    order (the 10 of mFR, then the release's validation perturbations). A noise perturbation has
    difficulty d > 1 when its ``<name>_<d>`` folder exists; the other perturbations have one set of
    videos, read at strides 1..3, so they list [1, 2, 3].
    Raises DatasetLayoutError if ``root`` is missing, holds a folder that is not a perturbation
    (or ``<noise>_2|3``), or holds none."""
    root = Path(root)
    layout = ImageNetP.layout
    _require_folder(root, "ImageNet-P", layout)
    names = [f.name for f in _subfolders(root)]
    valid = set(metrics.IMAGENET_P_ALL) | {f"{n}_{d}" for n in metrics.NOISE_PERTURBATIONS for d in (2, 3)}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise DatasetLayoutError(f"ImageNet-P: folder(s) {', '.join(unknown[:5])} in {str(root)!r} are not perturbation names; "
                                 f"expected {layout} with perturbations from: {', '.join(metrics.IMAGENET_P_ALL)} "
                                 f"(noise difficulties 2 and 3 as <name>_2, <name>_3)."
                                 f"{_nesting_hint(root, unknown, valid, 'perturbation')}")
    contents = {}
    for name in metrics.IMAGENET_P_ALL:
        if name in metrics.NOISE_PERTURBATIONS:
            levels = [d for d, folder in ((1, name), (2, f"{name}_2"), (3, f"{name}_3")) if folder in names]
            if levels:
                contents[name] = levels
        elif name in names:
            contents[name] = [1, 2, 3]
    if not contents:
        raise DatasetLayoutError(f"ImageNet-P: no perturbation folders in {str(root)!r}; expected {layout}")
    return contents


IMAGENET9_OTHER_FOLDERS = ("fg_mask",)  # the backgrounds-challenge release's foreground masks: not a variant


def imagenet9_contents(root: PathLike) -> List[str]:
    """The ImageNet-9 variants present under ``root`` (those with a ``<variant>/val`` folder), in
    IMAGENET9_VARIANTS order. Raises DatasetLayoutError if ``root`` is missing or has none."""
    root = Path(root)
    _require_folder(root, "ImageNet-9", ImageNet9.layout)
    present = [v for v in metrics.IMAGENET9_VARIANTS if (root / v / "val").is_dir()]
    if not present:
        found = [f.name for f in _subfolders(root)]
        raise DatasetLayoutError(f"ImageNet-9: no <variant>/val folder in {str(root)!r} (found: {', '.join(found[:9]) or 'nothing'}); "
                                 f"expected {ImageNet9.layout} with variants from: {', '.join(metrics.IMAGENET9_VARIANTS)}")
    misnamed = [f.name for f in _subfolders(root) if (f / "val").is_dir()
                and f.name not in metrics.IMAGENET9_VARIANTS + IMAGENET9_OTHER_FOLDERS]
    if misnamed:  # a variant under another name would be left out unnoticed (mixed-same: no bg_gap)
        raise DatasetLayoutError(f"ImageNet-9: folder(s) {', '.join(misnamed[:5])} in {str(root)!r} hold val/ but are "
                                 f"not variant names; expected {ImageNet9.layout} with variants from: "
                                 f"{', '.join(metrics.IMAGENET9_VARIANTS)}: rename them")
    return present


class ImageNetP(ImageFolderBenchmark):
    """One perturbation of ImageNet-P: ``<root>/<perturbation>/<wnid>/<sequence>.mp4`` (or ``.npy``
    arrays, uint8 (T, H, W, 3) or (T, 3, H, W)); item = (frames float (T, 3, H, W) in [0, 1],
    1k target). ``transform`` receives the uint8 (T, 3, H, W) frames.

    difficulty: 1..3. For the noise perturbations the harder sequences are separate videos in
    ``<perturbation>_2`` and ``<perturbation>_3`` (as the release and ``lkfast.data.render`` lay
    them out); for the others difficulty is the frame stride of the metrics (the same videos), kept
    here as ``self.stride`` for ``lkfast.metrics.flip_probability``.

    frames: how many frames every sequence must have (``self.frames``). Default: the count most
    sequences have, read from the headers of five sequences spread over the folder, or of every
    sequence where those five disagree (ties go to the release's count, 41 for translate and 31
    for the others, which is also used when none can be read). A sequence with another count (a partly decodable video, an array cut short) is
    skipped like an unreadable file, with a warning naming it: the metrics compare frames across
    sequences, and one odd length would stop the whole run.

    class_index: {class folder name: target} (default: ImageNet's {wnid: 1k index}); the metrics do
    not use the targets, but every folder must be named in it.

    A sequence there both as x.mp4 and as x.npy is read once, from the .npy, with a warning.
    """

    name = "ImageNet-P"
    layout = "<root>/<perturbation>[_<difficulty>]/<wnid>/<sequence>.mp4"

    def __init__(self, root: PathLike, perturbation: str, transform: Optional[Callable] = None,
                 limit: Optional[int] = None, difficulty: int = 1, frames: Optional[int] = None,
                 spread: bool = False, class_index: Optional[Dict[str, int]] = None):
        if perturbation not in metrics.IMAGENET_P_ALL:
            raise ValueError(f"unknown perturbation {perturbation!r}; valid: {', '.join(metrics.IMAGENET_P_ALL)}")
        if isinstance(difficulty, bool) or difficulty not in (1, 2, 3):
            raise ValueError(f"difficulty must be an integer in 1..3; got {difficulty!r}")
        self.perturbation, self.difficulty = perturbation, difficulty
        self.noise = perturbation in metrics.NOISE_PERTURBATIONS
        self.stride = 1 if self.noise else difficulty
        folder = perturbation if difficulty == 1 or not self.noise else f"{perturbation}_{difficulty}"
        root = Path(root)
        _require_folder(root, "ImageNet-P", self.layout)
        if not (root / folder).is_dir():
            present = [f.name for f in _subfolders(root)]
            raise DatasetLayoutError(f"ImageNet-P: no folder {folder!r} in {str(root)!r}; found: "
                                     f"{', '.join(present[:12]) or 'no folders'}. Expected {self.layout}")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 2):
            raise ValueError(f"frames must be an integer >= 2 (the frames of every sequence) or None to read it "
                             f"from the sequences; got {frames!r}")
        super().__init__(root / folder, transform, class_index=class_index, limit=limit, spread=spread)
        self.frames = frames if frames is not None else self._common_length()

    def _find(self, class_index, classes):
        samples, used = _scan(self.root, self.name, self.layout, class_index, suffixes=SEQUENCE_SUFFIXES)
        # x.mp4 beside x.npy is one sequence twice (a conversion, a second rendering): read once, the lossless one
        arrays = {p.with_suffix("") for p, _ in samples if p.suffix.lower() == ".npy"}
        twice = [p for p, _ in samples if p.suffix.lower() != ".npy" and p.with_suffix("") in arrays]
        if twice:
            warnings.warn(f"{self.name}: {len(twice)} sequence(s) in {str(self.root)!r} are there as .mp4 and as .npy "
                          f"(first: {twice[0]}); each is read once, from its .npy")
            skip = set(twice)
            samples = [(p, t) for p, t in samples if p not in skip]
        return samples, used

    def _common_length(self, probes: int = 5) -> int:
        from lkfast.corrupt import PERTURBATIONS

        n = len(self.samples)
        picked = sorted({round(k * (n - 1) / (probes - 1)) for k in range(probes)})
        counts = collections.Counter(t for t in (_sequence_length(self.samples[i][0]) for i in picked) if t)
        if len(counts) > 1:  # the probes disagree: five say nothing of the majority (three short videos
            # at the probed places made every release-length one "unreadable"); headers are cheap to read
            counts = collections.Counter(t for t in (_sequence_length(path) for path, _ in self.samples) if t)
        release = PERTURBATIONS[self.perturbation]
        if not counts:
            return release
        # most common; on a tie the release's count, else the longer
        return max(counts, key=lambda t: (counts[t], t == release, t))

    def _decode(self, path: Path):
        frames = _decode_sequence(path)
        if frames.shape[0] != self.frames:
            raise ValueError(f"{frames.shape[0]} frames where the sequences of {self.root.name!r} have {self.frames} "
                             "(a video cut short, or one from another set?)")
        return frames


def imagenet9_folder_targets(names: Sequence[str], where: PathLike = "") -> Dict[str, int]:
    """{class folder name: ImageNet-9 target 0..8} for the class folders ``names`` of one variant.

    A folder is named by its target, as the release numbers them (``NN_<name>``, NN = 00..08 in
    IMAGENET9_CLASSES order: ``00_dog`` .. ``08_fish``; the part after ``NN_`` may be any name, but
    one of IMAGENET9_CLASSES must be NN's), or by its class name (``dog``) or wnid
    (``n02084071``, IMAGENET9_WNIDS). A subset of the nine classes is fine. Targets never come from
    the folders' sort order: that differs between these namings (sorted names put bird first).
    Raises DatasetLayoutError (naming ``where``) for no folders, any other folder name, a number
    whose class name disagrees, or two folders of one class."""
    where = f" in {str(where)!r}" if str(where) else ""
    accepted = ("the release's numbered folders 00_dog .. 08_fish, the class names "
                f"{', '.join(IMAGENET9_CLASSES)}, or their wnids {', '.join(IMAGENET9_WNIDS)}")
    by_name = {name: i for i, name in enumerate(IMAGENET9_CLASSES)}
    by_name.update({wnid: i for i, wnid in enumerate(IMAGENET9_WNIDS)})
    targets, unknown, conflicts = {}, [], []
    for name in names:
        numbered = re.fullmatch(r"(\d+)_(.+)", name)
        if numbered and int(numbered.group(1)) <= 8:
            target, rest = int(numbered.group(1)), numbered.group(2)
            if rest in by_name and by_name[rest] != target:
                conflicts.append(f"{name} (number {target} is {IMAGENET9_CLASSES[target]}, "
                                 f"the name is {IMAGENET9_CLASSES[by_name[rest]]})")
            targets[name] = target
        elif name in by_name:
            targets[name] = by_name[name]
        else:
            unknown.append(name)
    if not names:
        raise DatasetLayoutError(f"ImageNet-9: no class folders{where}; expected {accepted}")
    if unknown:
        raise DatasetLayoutError(f"ImageNet-9: {len(unknown)} class folder(s){where} are not ImageNet-9 classes: "
                                 f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}; expected {accepted}. "
                                 "Rename them so each says its class (targets are not guessed from sort order)")
    if conflicts:
        raise DatasetLayoutError(f"ImageNet-9: class folder(s){where} whose number and name disagree: "
                                 f"{', '.join(conflicts)}; the release numbers them 00_dog .. 08_fish")
    seen: Dict[int, str] = {}
    for name, target in targets.items():
        if target in seen:
            raise DatasetLayoutError(f"ImageNet-9: folders {seen[target]} and {name}{where} are both class "
                                     f"{target} ({IMAGENET9_CLASSES[target]}); keep one folder per class")
        seen[target] = name
    return targets


class ImageNet9(ImageFolderBenchmark):
    """One ImageNet-9 variant of the backgrounds-challenge release: ``<root>/<variant>/val/<class>/*``;
    targets 0..8 (IMAGENET9_CLASSES). Class folders are named as :func:`imagenet9_folder_targets`
    accepts (the release's ``00_dog`` .. ``08_fish``, a class name, or a class wnid); any other
    folder raises DatasetLayoutError. If ``root`` holds an ``in_to_in9.json``, it is checked
    against :func:`imagenet9_class_map` (DatasetLayoutError if it differs). Score 1000-class models
    with ``lkfast.metrics.imagenet9_accuracy``. The release's images are 224 x 224 and its own
    evaluation feeds them as they are: use ``transform_for(cfg, resize=False)``, as for ImageNet-C."""

    name = "ImageNet-9"
    layout = "<root>/<variant>/val/<NN_class>/<image>"

    def __init__(self, root: PathLike, variant: str, transform: Optional[Callable] = None,
                 limit: Optional[int] = None, spread: bool = False):
        if variant not in metrics.IMAGENET9_VARIANTS:
            raise ValueError(f"unknown ImageNet-9 variant {variant!r}; valid: {', '.join(metrics.IMAGENET9_VARIANTS)}")
        root = Path(root)
        _require_folder(root, "ImageNet-9", self.layout)
        self.variant = variant
        self.map_checked = check_imagenet9_map(root)
        folder = root / variant / "val"
        if not folder.is_dir():
            present = [f.name for f in _subfolders(root)]
            hint = (f" {str(root / variant)!r} exists but has no 'val' folder." if (root / variant).is_dir() else "")
            raise DatasetLayoutError(f"ImageNet-9: no folder {str(folder)!r}; variants found: {', '.join(present) or 'none'}."
                                     f"{hint} Expected {self.layout}")
        super().__init__(folder, transform, limit=limit, spread=spread)

    def _find(self, class_index, classes):
        index = imagenet9_folder_targets([f.name for f in _subfolders(self.root)], self.root)
        return _scan(self.root, self.name, self.layout, index)


def collate_skipping(batch: Sequence[Tuple[Optional[torch.Tensor], int]]):
    """DataLoader collate_fn for these readers: drops the items that could not be decoded
    (image None) and returns ``(images, targets, n_skipped)``: images stacked (None if every
    item was skipped), targets a LongTensor of the kept items, n_skipped an int to add to the
    report's count of unreadable files."""
    kept = [(x, t) for x, t in batch if x is not None]
    skipped = len(batch) - len(kept)
    targets = torch.tensor([t for _, t in kept], dtype=torch.long)
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, targets, skipped


__all__ = ["DatasetLayoutError", "looks_like_wnids", "IMAGENET9_CLASSES", "IMAGENET9_WNIDS", "imagenet_classes", "imagenet_a_indices",
           "imagenet_r_indices", "imagenet_a_wnids", "imagenet_r_wnids", "imagenet_o_wnids", "imagenet_o_indices",
           "imagenet9_class_map", "imagenet9_folder_targets", "check_imagenet9_map", "to_float_image", "transform_for", "ImageFolderBenchmark",
           "ImageNetVal", "ImageNetA", "ImageNetR", "ImageNetO", "imagenet_c_contents", "ImageNetC", "ImageNetP",
           "ImageNet9", "collate_skipping", "imagenet_p_contents", "imagenet9_contents", "SEQUENCE_SUFFIXES", "select_items"]

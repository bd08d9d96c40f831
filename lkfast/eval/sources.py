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

    return collate_skipping(batch)


def loader_for(dataset, batches: Sequence[List[int]], options, device: str):
    """A DataLoader yielding (images, targets, n_skipped) for the given index batches, decoding in
    ``--workers`` processes, with pinned memory when evaluating on CUDA."""
    workers = max(0, int(options.workers))
    return DataLoader(dataset, batch_sampler=list(batches), num_workers=workers, collate_fn=_collate,
                      pin_memory=device.startswith("cuda") and torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None, persistent_workers=False)

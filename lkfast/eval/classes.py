"""The class space a benchmark is scored in: which folder name is which logit, which logits the
200-class benchmarks read, and how the logits map to ImageNet-9's nine classes.

ImageNet-1k is the default (``imagenet_class_space()``); the embedded synthetic benchmark, or any
other label set, brings its own ``ClassSpace`` and the same tasks run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Dict, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class ClassSpace:
    """A model's label set as the benchmarks see it.

    name: shown in the report (e.g. "ImageNet-1k").
    class_names: the folder name of each class index (ImageNet: the 1000 wnids in logit order);
        ``len(class_names)`` is the number of logits a model must output.
    subsets: task name -> the logit indices it is scored on (ImageNet: "imagenet-a" and "imagenet-r",
        200 each). A task with no entry here takes the classes whose folders its dataset holds
        (that is how ImageNet-O's 200 classes are found).
    nine_map: class index -> ImageNet-9 class (0..8) or -1 outside the nine; None when the class
        space has no ImageNet-9 counterpart (the imagenet-9 task then refuses to run).
    nine_names: names of the nine classes in target order (ImageNet-9: dog, bird, ...; the folders
        are ``NN_<name>``, read by ``lkfast.data.ImageNet9``).
    published_baselines: True for ImageNet-1k: ImageNet-C's CE is normalised by the release's
        published AlexNet errors (``lkfast.metrics.ALEXNET_ERRORS``). Otherwise the baseline model
        (``--baseline-model`` / the default's) is evaluated on the same ImageNet-C images and its
        errors take AlexNet's place; without one, CE / mCE are None with ``mce_note``.
    about: what the data is, said at the top of the report of a class space other than ImageNet-1k
        (whose numbers are then over other images and classes than the benchmarks' releases).
    """

    name: str
    class_names: Tuple[str, ...]
    subsets: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    nine_map: Optional[Tuple[int, ...]] = None
    nine_names: Tuple[str, ...] = ()
    published_baselines: bool = False
    about: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of everything that maps folders and logits to scores (class names in order,
        subsets, the ImageNet-9 map and names, the baselines rule): a cached result or stored
        records computed in one class space are never read back in another."""
        from lkfast.eval.cache import stable_hash

        return stable_hash([list(self.class_names), {k: list(v) for k, v in sorted(self.subsets.items())},
                            None if self.nine_map is None else list(self.nine_map), list(self.nine_names),
                            self.published_baselines])

    def folder_index(self) -> Dict[str, int]:
        """Folder name -> class index."""
        return {name: i for i, name in enumerate(self.class_names)}

    def subset(self, task: str, folders: Sequence[str] = ()) -> Tuple[int, ...]:
        """The logit indices ``task`` is scored on: the registered subset, else the classes of
        ``folders`` (sorted by index). Raises ValueError for a folder outside the class space."""
        if task in self.subsets:
            return tuple(self.subsets[task])
        index = self.folder_index()
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ValueError(f"{task}: {len(unknown)} class folder(s) are not {self.name} classes: "
                             f"{', '.join(sorted(unknown)[:5])}")
        return tuple(sorted(index[f] for f in folders))


@lru_cache(maxsize=1)
def imagenet_class_space() -> ClassSpace:
    """ImageNet-1k: wnids in logit order, the ImageNet-A/-R index lists shipped with timm, and the
    backgrounds-challenge 1000 -> 9 map (all read through ``lkfast.data``)."""
    from lkfast import data

    return ClassSpace(
        name="ImageNet-1k",
        class_names=tuple(data.imagenet_classes()),
        subsets={"imagenet-a": tuple(int(i) for i in data.imagenet_a_indices()),
                 "imagenet-r": tuple(int(i) for i in data.imagenet_r_indices())},
        nine_map=tuple(int(i) for i in data.imagenet9_class_map()),
        nine_names=tuple(data.IMAGENET9_CLASSES),
        published_baselines=True,
    )

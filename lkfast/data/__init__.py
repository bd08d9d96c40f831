"""File input/output and datasets: image and video IO, readers for the robustness benchmarks'
on-disk layouts, and the synthetic default benchmark.

``lkfast.data`` may use ``lkfast.corrupt``; ``lkfast.corrupt`` never imports ``lkfast.data``.
Each submodule re-exports its public names below (one import line per submodule).
"""
from .io import IMAGE_SUFFIXES, encode_jpeg, encode_mp4, encode_npy, encode_png, image_files, is_complete, list_images, load_image, read_mp4, to_uint8, write_atomic  # noqa: E402,F401
from .writer import render  # noqa: E402,F401
from .imagenet import (DatasetLayoutError, ImageFolderBenchmark, ImageNet9, ImageNetA, ImageNetC, ImageNetO, ImageNetP, ImageNetR, ImageNetVal, IMAGENET9_CLASSES, check_imagenet9_map, collate_skipping, imagenet9_class_map, imagenet9_contents, imagenet_a_indices, imagenet_c_contents, imagenet_classes, imagenet_o_indices, imagenet_o_wnids, imagenet_p_contents, imagenet_r_indices, select_items, transform_for)  # noqa: E402,F401
from . import synthetic  # noqa: E402,F401  (the embedded default benchmark: lkfast.data.synthetic)

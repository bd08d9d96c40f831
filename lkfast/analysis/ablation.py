"""The kernel-size ablation (the paper's Tables 5 and 7): which kernel size a model has, which models
form one ablation family, and the family's rows in the paper's two table layouts.

A family is one architecture trained at several kernel sizes: RepLKNet-31B against RepLKNet-3B
(``replknet_31b`` / ``replknet_3b``), ConvNeXt-T at 3/7/13/31/51 (``convnext_tiny`` trained with
``python -m lkfast.train convnext_tiny --kernel-sizes K``), the embedded default's
``replknet_tiny_k31`` ... ``replknet_tiny_k3``.

    model_kernel_size(model)          largest depthwise kernel side (None: no depthwise convolution)
    kernel_family(name)               the architecture name without its kernel size
    ablation_families(models)         {family: [(kernel, label), ...]} for families with >= 2 sizes
    TABLE5_COLUMNS, TABLE7_COLUMNS    (header, task, key) of each table's metric columns
    table5_rows / table7_rows         the rows, with the change against a reference model
    table5_csv                        Table 5 as numbers (value and change columns) for its CSV
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from lkfast.analysis.kernels import depthwise_kernels

# (column header, task, key in the task's results): Table 5 of the paper (ImageNet-C = mean top-1 at
# severity 5, the magnitude of the paper's 49.2 for RepLKNet-31B; ImageNet-O = AUPR), and Table 7.
TABLE5_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("ImageNet-A", "imagenet-a", "top1"), ("ImageNet-C", "imagenet-c", "sev5_top1"),
    ("ImageNet-R", "imagenet-r", "top1"), ("ImageNet-O", "imagenet-o", "aupr"),
    ("Salient-Drop-50%", "occlusion", "salient_drop_50"), ("Noise-0.7π", "frequency", "change_at_0_7pi"))
TABLE7_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("ImgN", "clean", "top1"), ("ImgN-A", "imagenet-a", "top1"), ("ImgN-R", "imagenet-r", "top1"))
# Every task whose numbers the two tables show (the eval's "ablation" suite runs them).
TABLE_TASKS: Tuple[str, ...] = tuple(dict.fromkeys(t for _, t, _ in TABLE7_COLUMNS + TABLE5_COLUMNS))

_KERNEL_MARKERS = (
    re.compile(r"^(replknet)_\d+([a-z]+)$"),      # replknet_31b, replknet_3b -> replknet_b
    re.compile(r"^(.*?)_k\d+$"),                  # replknet_tiny_k31 -> replknet_tiny
)


def model_kernel_size(model: nn.Module) -> Optional[int]:
    """The largest side of ``model``'s stride-1 depthwise kernels (RepLKNet's large-kernel layers,
    merged or not; every depthwise ``nn.Conv2d`` elsewhere, 3x3 included), or None when it has none
    (a ViT, a ResNet)."""
    kernels = depthwise_kernels(model, min_kernel_size=1)
    sides = [max(int(k.shape[-2]), int(k.shape[-1])) for _, k in kernels]
    return max(sides) if sides else None


def kernel_family(name: str) -> str:
    """The architecture ``name`` (a timm/lkfast model name, pretrained tag dropped) without its kernel
    size: ``replknet_31b`` and ``replknet_3b`` -> ``replknet_b``; ``replknet_tiny_k13`` ->
    ``replknet_tiny``; ``convnext_tiny`` (its size is a ``kernel_sizes`` argument) stays as it is."""
    base = name.split(".")[0]
    for pattern in _KERNEL_MARKERS:
        match = pattern.match(base)
        if match:
            return "_".join(g for g in match.groups() if g)
    return base


def ablation_families(models: Mapping[str, Tuple[str, Optional[int]]]) -> Dict[str, List[Tuple[int, str]]]:
    """Group models into ablation families. ``models``: label -> (family, kernel size or None).
    Returns family -> [(kernel size, label), ...] sorted by kernel size then label, keeping only
    families measured at two or more kernel sizes (one size is not an ablation)."""
    families: Dict[str, List[Tuple[int, str]]] = {}
    for label, (family, kernel) in models.items():
        if kernel is not None:
            families.setdefault(family, []).append((int(kernel), label))
    return {f: sorted(rows) for f, rows in families.items() if len({k for k, _ in rows}) >= 2}


def _value(entry: Mapping[str, Any], task: str, key: str) -> Optional[float]:
    value = entry.get(task)
    value = value.get(key) if isinstance(value, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _with_change(value: Optional[float], reference: Optional[float]) -> Any:
    """The paper's "29.4 (+2.7)"; the bare value (one decimal) when there is nothing to compare with."""
    if value is None:
        return None
    value = value + 0.0  # no "-0.0"
    if reference is None:
        return f"{value:.1f}"
    return f"{value:.1f} ({value - reference + 0.0:+.1f})"


def _measured(results: Mapping[str, Mapping[str, Any]], members: Sequence[Tuple[int, str]], columns,
              reference: Optional[str], reference_row: bool):
    """(label, kernel, [(value, the reference's value or None) per column]) for each row of a table: the
    reference first, with kernel None, when ``reference_row`` and it is not a member, then the members;
    the reference's own row and every row without a reference get None to compare with."""
    base = results.get(reference, {}) if reference else {}
    rows = list(members)
    if reference is not None and reference_row and reference not in [label for _, label in members]:
        rows.insert(0, (None, reference))
    for kernel, label in rows:
        yield label, kernel, [(_value(results[label], t, k),
                               None if reference is None or label == reference else _value(base, t, k))
                              for _, t, k in columns]


def _rows(results: Mapping[str, Mapping[str, Any]], members: Sequence[Tuple[int, str]], columns,
          reference: Optional[str], reference_row: bool) -> List[list]:
    return [[label, "—" if kernel is None else f"{kernel}×{kernel}"]
            + [value if reference is None else _with_change(value, against) for value, against in cells]
            for label, kernel, cells in _measured(results, members, columns, reference, reference_row)]


def table5_rows(results: Mapping[str, Mapping[str, Any]], members: Sequence[Tuple[int, str]],
                reference: Optional[str] = None) -> List[list]:
    """Table 5's rows for one family (``members`` from ``ablation_families``): Model, Kernel, then
    ImageNet-A, -C, -R, -O, Salient-Drop-50%, Noise-0.7π, each "value (change)" with one decimal
    against ``reference`` (a label of ``results``; the paper uses ViT-B, shown as its own row), the
    bare value where the reference did not measure that column, plain numbers when ``reference``
    is None. ``results``: label -> task ->
    metrics, as in results.json."""
    return _rows(results, members, TABLE5_COLUMNS, reference, reference_row=True)


def table5_csv(results: Mapping[str, Mapping[str, Any]], members: Sequence[Tuple[int, str]],
               reference: Optional[str] = None) -> Tuple[List[str], List[list]]:
    """Table 5 as numbers for its CSV: (header, rows) with Model, Kernel (an int; None for a model
    without one), then each column's value and its change against ``reference`` (None where there is
    none), where ``table5_rows`` writes "value (change)" text."""
    header = ["Model", "Kernel"] + [h for name, _, _ in TABLE5_COLUMNS for h in (name, f"{name} change")]
    rows = [[label, kernel] + [x for value, against in cells
                               for x in (value, None if value is None or against is None else value - against)]
            for label, kernel, cells in _measured(results, members, TABLE5_COLUMNS, reference, reference_row=True)]
    return header, rows


def table7_rows(results: Mapping[str, Mapping[str, Any]], members: Sequence[Tuple[int, str]]) -> List[list]:
    """Table 7's rows for one family: Model, Kernel, ImageNet top-1, ImageNet-A top-1, ImageNet-R top-1."""
    return _rows(results, members, TABLE7_COLUMNS, None, reference_row=False)

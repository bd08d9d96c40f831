"""The residual blocks of a model: what the lesion study removes and the feature-variance study probes.

A block here is a residual unit. The lesion removes only the blocks whose output has their input's
shape, so replacing one with the identity (keeping only the skip connection) leaves the network
runnable; the feature-variance study records the stem's and transitions' outputs and the result of
every residual addition (``variance_points``). Known families:

* RepLKNet (lkfast.models): a RepLK block together with the ConvFFN after it (the paper's unit);
* timm VisionTransformer and relatives with a ``blocks`` list (attention + MLP block);
* timm ConvNeXt: the blocks of every stage (the downsampling layers sit outside them);
* timm Swin Transformer: the blocks of every stage (``layers[i].blocks``; patch merging sits
  outside them; their outputs are (N, H, W, C) maps);
* timm ResNet: the blocks of ``layer1..layer4``, and timm ResNetV2 (BiT): the blocks of
  ``stages[i].blocks``; removable are those without a downsample shortcut (for ResNet, ReLU(x) = x
  on their non-negative inputs, so the identity is exactly "skip only");
* timm EfficientNet / MobileNetV3: the blocks of ``blocks[i]``; removable are those with a skip.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch.nn as nn

from lkfast.models import RepLKNet

KNOWN_FAMILIES = ("RepLKNet, timm VisionTransformer-like models (a 'blocks' list), timm ConvNeXt, timm Swin "
                  "Transformer, timm ResNet, timm ResNetV2 (BiT) and timm EfficientNet/MobileNetV3")


@dataclass(frozen=True)
class Block:
    """One residual block: the module names (relative to the model) that make it up, its stage
    index (None where the model has no stages) and its position in the model's forward order."""
    name: str
    modules: tuple
    stage: object
    index: int


def _is_vit(model: nn.Module) -> bool:
    return isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)) \
        and hasattr(model, "patch_embed")


def _find_units(model: nn.Module) -> tuple:
    """(prefix, [(Block, removable)...]) of the first network of a known family inside ``model``
    (looking through wrappers such as a normalisation ``nn.Sequential``), every block in forward
    order; ValueError naming the known families when there is none."""
    for prefix, net in model.named_modules():
        units = _units_of(net)
        if units is not None:
            if prefix:
                units = [(Block(b.name, tuple(f"{prefix}.{m}" for m in b.modules), b.stage, b.index), removable)
                         for b, removable in units]
            return prefix, units
    raise ValueError(f"no residual blocks found in {type(model).__name__}: known families are {KNOWN_FAMILIES}")


def residual_blocks(model: nn.Module) -> list:
    """The shape-preserving residual blocks of ``model`` in forward order (see the module docstring):
    the blocks the lesion may remove.

    Looks through a wrapper (e.g. a normalisation ``nn.Sequential``) to the first known network
    inside. Raises ValueError for a model of no known family, naming the families it knows.
    """
    _, units = _find_units(model)
    kept = [b for b, removable in units if removable]
    return [Block(b.name, b.modules, b.stage, i) for i, b in enumerate(kept)]


def all_blocks(model: nn.Module) -> list:
    """Every block of ``model`` in forward order, the ones with a downsampling shortcut too (a ResNet-50
    has 16, RepLKNet-31B 24, ViT-B 12): what "the proportion of blocks removed" counts against.
    ValueError as ``residual_blocks``."""
    return [b for b, _ in _find_units(model)[1]]


def _units_of(net: nn.Module):
    """[(Block, removable)...] of every block of ``net`` when it is a network of a known family, else None."""
    units = []

    def add(name, modules, stage, removable=True):
        units.append((Block(name, modules, stage, len(units)), removable))

    if isinstance(net, RepLKNet):
        for s, stage in enumerate(net.stages):
            for i in range(0, len(stage.blocks), 2):
                add(f"stages.{s}.pair{i // 2}", (f"stages.{s}.blocks.{i}", f"stages.{s}.blocks.{i + 1}"), s)
        return units
    if _is_vit(net):
        for i in range(len(net.blocks)):
            add(f"blocks.{i}", (f"blocks.{i}",), None)
        return units
    kind = type(net).__name__
    if kind in ("ConvNeXt", "ResNetV2") and hasattr(net, "stages"):
        for s, stage in enumerate(net.stages):
            for i, block in enumerate(stage.blocks):
                add(f"stages.{s}.blocks.{i}", (f"stages.{s}.blocks.{i}",), s,
                    getattr(block, "downsample", None) is None)
        return units
    if kind.startswith("SwinTransformer") and hasattr(net, "layers"):
        for s, stage in enumerate(net.layers):
            for i in range(len(stage.blocks)):
                add(f"layers.{s}.blocks.{i}", (f"layers.{s}.blocks.{i}",), s)
        return units
    if kind == "ResNet" and hasattr(net, "layer1"):
        for s in range(1, 5):
            for i, block in enumerate(getattr(net, f"layer{s}", None) or []):
                add(f"layer{s}.{i}", (f"layer{s}.{i}",), s - 1, getattr(block, "downsample", None) is None)
        return units
    if kind in ("EfficientNet", "MobileNetV3") and hasattr(net, "conv_stem"):
        for s, stage in enumerate(net.blocks):
            for i, block in enumerate(stage):
                add(f"blocks.{s}.{i}", (f"blocks.{s}.{i}",), s, bool(getattr(block, "has_skip", False)))
        return units
    return None


def output_modules(model: nn.Module) -> list:
    """(name, module) of every block of the model's family in forward order, the downsampling ones
    too; for RepLKNet the RepLK block and the ConvFFN separately. ValueError as ``residual_blocks``.
    (The feature-variance study records more places: ``variance_points``.)"""
    named = dict(model.named_modules())
    return [(name, named[name]) for block in all_blocks(model) for name in block.modules]


def _pre_norm_transformer_block(module: nn.Module) -> bool:
    """timm's pre-norm attention blocks (ViT/DeiT ``Block``, Swin's ``SwinTransformerBlock``): two
    residuals, x + attn(norm1(x)) and then x + mlp(norm2(x)), so norm2's input is the first one's result."""
    try:
        from timm.models.swin_transformer import SwinTransformerBlock
        from timm.models.vision_transformer import Block as VitBlock
    except ImportError:
        return False
    return isinstance(module, (VitBlock, SwinTransformerBlock))


def variance_points(model: nn.Module) -> list:
    """(name, module, side) of every place whose features the feature-variance study records, in
    forward order, ``side`` "input" (a forward pre-hook's input) or "output":

    * where the network leaves its stem and each transition between stages: the input of the first
      block of every stage (of the first block, for a model without stages), named "<block>:in";
    * after every residual addition: a pre-norm attention block (timm ViT/DeiT, Swin) holds two,
      the attention's ("<block>:attn", norm2's input) and the MLP's (the block's output); RepLKNet's
      RepLK block and ConvFFN are two blocks; the other families' blocks one each (their output).

    The paper's Fig. 10 script records at this granularity (for ViT the embedding and each MSA and
    MLP residual; for RepLKNet the stem, every block and the transitions); one point per ViT block
    hides the attention/MLP alternation that RepLKNet's per-sub-block points show. A stage input
    that is the previous block's output itself (ResNet: the stride sits in the first block) is the
    same map and is recorded once (``feature_map_variance`` drops it). ValueError as ``residual_blocks``.
    """
    named = dict(model.named_modules())
    points, stage = [], object()
    for block in all_blocks(model):
        if not points or (block.stage is not None and block.stage != stage):
            points.append((f"{block.modules[0]}:in", named[block.modules[0]], "input"))
        stage = block.stage
        for name in block.modules:
            module = named[name]
            if _pre_norm_transformer_block(module):
                points.append((f"{name}:attn", module.norm2, "input"))
            points.append((name, module, "output"))
    return points


def channels_last_outputs(model: nn.Module) -> bool:
    """Whether the blocks of ``model`` give (N, H, W, C) maps (timm's Swin declares ``output_fmt = "NHWC"``)."""
    return any(getattr(m, "output_fmt", None) == "NHWC" for m in model.modules())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextlib.contextmanager
def blocks_removed(model: nn.Module, blocks: Sequence[Block]) -> Iterator[nn.Module]:
    """Within the block, each of ``blocks`` is replaced by ``nn.Identity`` (only its skip connection
    remains); the original modules are put back on exit, also after an error."""
    saved = []
    try:
        for block in blocks:
            for name in block.modules:
                saved.append((name, model.get_submodule(name)))
                _set_submodule(model, name, nn.Identity())
        yield model
    finally:
        for name, module in reversed(saved):
            _set_submodule(model, name, module)


"""The residual blocks of a model: what the lesion study removes and the feature-variance study probes.

A block here is a residual unit whose output has its input's shape, so replacing it with the
identity (keeping only the skip connection) leaves the network runnable. Known families:

* RepLKNet (lkfast.models): a RepLK block together with the ConvFFN after it (the paper's unit);
* timm VisionTransformer and relatives with a ``blocks`` list (attention + MLP block);
* timm ConvNeXt: the blocks of every stage (the downsampling layers sit outside them);
* timm ResNet: the blocks of ``layer1..layer4`` without a downsample shortcut (ReLU(x) = x on their
  non-negative inputs, so the identity is exactly "skip only").
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch.nn as nn

from lkfast.models import RepLKNet


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


def residual_blocks(model: nn.Module) -> list:
    """The shape-preserving residual blocks of ``model`` in forward order (see the module docstring).

    Looks through a wrapper (e.g. a normalisation ``nn.Sequential``) to the first known network
    inside. Raises ValueError for a model of no known family, naming the families it knows.
    """
    for prefix, net in model.named_modules():
        blocks = _blocks_of(net)
        if blocks is not None:
            if prefix:
                blocks = [Block(b.name, tuple(f"{prefix}.{m}" for m in b.modules), b.stage, b.index) for b in blocks]
            return blocks
    raise ValueError(f"no residual blocks found in {type(model).__name__}: known families are RepLKNet, timm "
                     f"VisionTransformer-like models (a 'blocks' list), timm ConvNeXt and timm ResNet")


def _blocks_of(net: nn.Module):
    blocks = []
    if isinstance(net, RepLKNet):
        for s, stage in enumerate(net.stages):
            for i in range(0, len(stage.blocks), 2):
                names = (f"stages.{s}.blocks.{i}", f"stages.{s}.blocks.{i + 1}")
                blocks.append(Block(f"stages.{s}.pair{i // 2}", names, s, len(blocks)))
        return blocks
    if _is_vit(net):
        return [Block(f"blocks.{i}", (f"blocks.{i}",), None, i) for i in range(len(net.blocks))]
    kind = type(net).__name__
    if kind == "ConvNeXt" and hasattr(net, "stages"):
        for s, stage in enumerate(net.stages):
            for i in range(len(stage.blocks)):
                blocks.append(Block(f"stages.{s}.blocks.{i}", (f"stages.{s}.blocks.{i}",), s, len(blocks)))
        return blocks
    if kind == "ResNet" and hasattr(net, "layer1"):
        for s in range(1, 5):
            layer = getattr(net, f"layer{s}", None)
            for i, block in enumerate(layer or []):
                if getattr(block, "downsample", None) is None:
                    blocks.append(Block(f"layer{s}.{i}", (f"layer{s}.{i}",), s - 1, len(blocks)))
        return blocks
    return None


def output_modules(model: nn.Module) -> list:
    """(name, module) of every module whose output the feature-variance study records, in forward
    order: each residual block (for RepLKNet the RepLK block and the ConvFFN separately; for ResNet
    every block, downsampling ones included)."""
    named = dict(model.named_modules())
    resnets = [(p, m) for p, m in model.named_modules() if type(m).__name__ == "ResNet" and hasattr(m, "layer1")]
    if resnets and not any(isinstance(m, RepLKNet) or _is_vit(m) for m in model.modules()):
        prefix, net = resnets[0]  # every block, the downsampling ones too: variance needs no shape match
        return [(f"{prefix}.{n}" if prefix else n, m) for s in range(1, 5)
                for n, m in [(f"layer{s}.{i}", b) for i, b in enumerate(getattr(net, f"layer{s}", None) or [])]]
    out = []
    for block in residual_blocks(model):
        is_replknet_pair = len(block.modules) == 2
        for name in (block.modules if is_replknet_pair else block.modules[-1:]):
            out.append((name, named[name]))
    return out


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


"""Models: RepLKNet (official-checkpoint compatible, registered with timm) and a factory over timm.

    create_model(name, checkpoint=None, pretrained=False, fast=True, **kwargs)
    optimize_for_inference(model, compile=False); fold_batchnorms(model)   RepLKNet, BNs folded
    RepLKNet(large_kernel_sizes, layers, channels, small_kernel, ...); model.structural_reparam()
    replknet_31b, replknet_31l, replknet_xl, replknet_3b
"""
from lkfast.models.factory import CheckpointError, create_model, extract_state_dict, load_checkpoint, read_checkpoint
from lkfast.models.small import SMALL_MODELS, SYNTHETIC_MEAN, SYNTHETIC_STD  # registers the 64 px models
from lkfast.models.replknet import (OFFICIAL_CHECKPOINTS, RepLKNet, fold_batchnorms, optimize_for_inference, replknet_3b,
                                    replknet_31b, replknet_31l, replknet_xl)

__all__ = ["create_model", "load_checkpoint", "read_checkpoint", "extract_state_dict", "CheckpointError", "RepLKNet",
           "replknet_31b", "replknet_31l", "replknet_xl", "replknet_3b", "OFFICIAL_CHECKPOINTS", "fold_batchnorms",
           "optimize_for_inference"]

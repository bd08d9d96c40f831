"""Section 4 of Chen et al. (ICML 2024): why large-kernel ConvNets are robust. Each analysis takes a
model (that takes [0, 1] images) and tensors or a loader, and returns a plain JSON-able dict.

    occlusion_sweep(model, loader, ratios, modes, saliency)     Fig. 4-5 (random / salient / non-salient)
    dino_saliency(load_dino(path)), "masks"                     saliency sources for the occlusion
    lesion_sweep(model, loader, counts, draws=10)               Fig. 7
    frequency_sweep(model, loader, frequencies, eps)            Fig. 8
    kernel_attention_distance(model)                            Fig. 9
    feature_map_variance(model, x)                              Fig. 10
    model_kernel_size(model), kernel_family(name)               Tables 5 and 7 (lkfast.analysis.ablation)
    residual_blocks(model), blocks_removed(model, blocks)       what the lesion removes
    lkfast.analysis.plots                                       the figures

The attacks (Fig. 6, Table 4) are in lkfast.attacks.
"""
from lkfast.analysis import ablation
from lkfast.analysis.ablation import ablation_families, kernel_family, model_kernel_size
from lkfast.analysis.blocks import Block, all_blocks, blocks_removed, output_modules, residual_blocks, variance_points
from lkfast.analysis.frequency import FREQUENCIES, frequency_sweep
from lkfast.analysis.kernels import channel_distances, depthwise_kernels, kernel_attention_distance, paper_layers
from lkfast.analysis.lesion import default_counts, lesion_candidates, lesion_sweep
from lkfast.analysis.occlusion import (DINO_HEAD, MODES, RATIOS, dino_attention, dino_saliency, drop_masks, load_dino,
                                       mask_saliency, occlude, occlusion_sweep, random_patch_mask, saliency_patch_mask)
from lkfast.analysis.variance import feature_map_variance, spatial_variance

__all__ = ["occlusion_sweep", "occlude", "random_patch_mask", "saliency_patch_mask", "drop_masks", "mask_saliency",
           "dino_attention", "dino_saliency", "load_dino", "DINO_HEAD", "MODES", "RATIOS", "lesion_sweep", "lesion_candidates",
           "default_counts", "residual_blocks", "all_blocks", "blocks_removed", "output_modules", "variance_points", "Block",
           "frequency_sweep", "FREQUENCIES", "kernel_attention_distance", "channel_distances", "depthwise_kernels",
           "paper_layers", "feature_map_variance", "spatial_variance", "ablation", "ablation_families", "kernel_family",
           "model_kernel_size"]

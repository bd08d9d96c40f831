"""lkfast: fast large-kernel depthwise convolution, and the robustness protocol of
"Revealing the Dark Secrets of Extremely Large Kernel ConvNets on Robustness" (Chen et al., ICML 2024).

Subpackages and modules (data flows one way: ops <- nn <- models <- (corrupt <- data, attacks,
analysis, metrics) <- eval):

    lkfast.ops        depthwise_conv2d (the op and its backends), frequency_noise
    lkfast.nn         DepthwiseConv2d, ReparamLargeKernelConv, patch_model
    lkfast.models     RepLKNet, the small models of the default run, create_model
    lkfast.corrupt    ImageNet-C corruptions and ImageNet-P perturbations (tensor functions)
    lkfast.data       image/video IO, the benchmarks' readers, the synthetic default benchmark
    lkfast.metrics    accuracy, mCE, flip rate, top-5 distance, AUPR, BG-gap
    lkfast.attacks    FGSM, PGD, TAIG
    lkfast.analysis   occlusion, lesion, frequency sweep, kernel attention distance, feature variance
    lkfast.eval       python -m lkfast.eval
    lkfast.train      python -m lkfast.train
"""
__version__ = "0.1.0"

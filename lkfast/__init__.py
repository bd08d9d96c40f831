"""lkfast: fast large-kernel depthwise convolution, and the robustness protocol of
"Revealing the Dark Secrets of Extremely Large Kernel ConvNets on Robustness" (Chen et al., ICML 2024).

Subpackages (data flows one way): ops <- nn <- models <- (data, corrupt, attacks, analysis) <- eval.
"""
__version__ = "0.1.0"

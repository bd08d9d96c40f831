"""Backend choice on CUDA tensors. Until a GPU benchmark has measured a table, prefer lkfast's
CUDA kernels, then Triton, then PyTorch (cuDNN)."""
from __future__ import annotations


def choose(x, weight, usable) -> tuple[str, str, str]:
    for name in ("cuda", "triton"):
        if usable(name):
            return (name, name, name)
    return ("torch", "torch", "torch")

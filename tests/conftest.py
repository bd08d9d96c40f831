import pytest
import torch

# Deterministic, and quick on a 2-core machine.
torch.manual_seed(0)

# The tests compare fp32 results with fp64 references at fp32 tolerances: cuDNN's fp32 convolutions
# must not round their inputs to TF32 (its default on Ampere and later GPUs).
if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
    torch.backends.cudnn.conv.fp32_precision = "ieee"
else:  # torch before the fp32_precision settings
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

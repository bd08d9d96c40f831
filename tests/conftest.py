import os
import tempfile

import pytest
import torch

# The suite never reads or writes the user's cache (~/.cache/lkfast), and the CPU dispatch does not
# time backends on first use (lkfast.ops.cpu_dispatch): which backend `auto` runs must not depend
# on the machine's load during the tests. tests/test_cpu_dispatch.py turns calibration on itself.
os.environ.setdefault("LKFAST_CACHE", tempfile.mkdtemp(prefix="lkfast-test-cache-"))
os.environ.setdefault("LKFAST_CALIBRATE", "0")

# Deterministic, and quick on a 2-core machine.
torch.manual_seed(0)

# The tests compare fp32 results with fp64 references at fp32 tolerances: cuDNN's fp32 convolutions
# must not round their inputs to TF32 (its default on Ampere and later GPUs). Through allow_tf32, as
# lkfast.eval's ieee_fp32: with torch 2.9+'s cudnn.conv.fp32_precision = "ieee" instead, every read
# of allow_tf32 raises (torch.backends.cudnn.flags(...) among them).
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    2-core machine shared with other work, two oneDNN threads spin against each other and small
    models run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

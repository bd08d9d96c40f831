import os

import pytest
import torch

# Deterministic, and quick on a 2-core machine.
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def usable_backends(device: str = "cpu") -> list[str]:
    from lkfast.ops import available_backends

    out = []
    for name, info in available_backends().items():
        if info.available and (device in info.devices or (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1")):
            out.append(name)
    return out

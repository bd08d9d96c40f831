import pytest
import torch

# Deterministic, and quick on a 2-core machine.
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

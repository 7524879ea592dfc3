"""SPT test setup: import paths and seeding."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # repo root, so `spt_kernels` imports without an install
sys.path.insert(0, str(HERE))  # spt_references, shared by tests/spt and tests/spt/triton


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

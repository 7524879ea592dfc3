"""Backend choice: Triton only for CUDA tensors (or the CPU interpreter when asked), and no triton needed at all."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spt_kernels.dispatch import use_triton

REPO = Path(__file__).resolve().parents[2]


def test_auto_uses_the_reference_on_cpu():
    assert not use_triton("auto", torch.zeros(1))
    assert not use_triton("reference", torch.zeros(1))


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton("triton", torch.zeros(1))
    with pytest.raises(ValueError, match="backend"):
        use_triton("cuda", torch.zeros(1))


def test_package_runs_without_triton():
    """Block `import triton` in a fresh process: the package must import and run its reference path."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import spt_kernels
from spt_kernels.dispatch import triton_available
assert not triton_available()
q = torch.randn(1, 2, 8, 16)
codes = spt_kernels.pq_encode(q, torch.randn(2, 4, 8))
idx = spt_kernels.select_candidates(codes, codes, 2)
assert spt_kernels.sparse_attention(q, q, q, idx).shape == q.shape
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

"""Run tests/spt/triton on CPU under Triton's interpreter, in a fresh process.

triton decides between compiling and interpreting when a kernel is defined (it reads TRITON_INTERPRET then), so
the variable must be set before spt_kernels' triton modules are imported; setting it here would leak into every
other test of this session. On a CUDA machine the kernels tests run directly instead and this test is skipped.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spt_kernels.dispatch import triton_available

KERNEL_TESTS = Path(__file__).resolve().parent / "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, tests/spt/triton runs on the GPU directly")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernels_under_the_cpu_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report

"""Choose between the Triton kernels and the PyTorch reference for a call.

Triton is imported lazily so the package imports (and the reference path runs) on machines without it.
"""

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (read by triton when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether a call on `tensors` with `backend` ('auto', 'triton' or 'reference') runs the Triton kernels."""
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if not triton_available():
        raise RuntimeError("backend='triton' was requested but triton is not installed")
    if not (on_cuda or triton_interpreting()):
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run on CPU)")
    return True


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {tensor.dtype}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

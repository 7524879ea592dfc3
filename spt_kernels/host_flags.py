"""Host-side answers about small buffers that the forward pass branches on, so a CUDA step never waits on the GPU.

`bool(buffer)` or `torch.equal(buffer, ...)` on a GPU tensor makes the host wait for the device; on the hot
path that is one stall per layer per forward. An in-place write bumps a tensor's version counter (autograd's
own bookkeeping), and a replaced buffer (`.to()`, `load_state_dict(assign=True)`) is another object, so the
pair (object, version) says exactly when a cached answer is stale, whoever wrote the buffer: `calibrate`,
`ProductQuantizer.initialize`, `load_state_dict`, or `agents.checkpoint.load_weights` copying in place.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def host_flag(owner: nn.Module, buffer: str, compute: Callable[[torch.Tensor], T]) -> T:
    """compute(owner.<buffer>), recomputed only when that buffer was replaced or written since the last call."""
    tensor = getattr(owner, buffer)
    if tensor.is_inference():  # inference tensors keep no version counter: nothing safe to cache
        return compute(tensor)
    cache = owner.__dict__.setdefault("_host_flags", {})
    seen = cache.get(buffer)
    if seen is not None and seen[0] is tensor and seen[1] == tensor._version:
        return seen[2]
    value = compute(tensor)
    cache[buffer] = (tensor, tensor._version, value)
    return value

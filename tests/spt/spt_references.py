"""Independent dense references the SPT tests compare against (plain PyTorch, no SPT code)."""

import torch
import torch.nn.functional as F


def dense_attention(q, k, v, allowed, scale):
    """Plain softmax attention over an explicit (B, H, Lq, Lk) boolean mask; rows with no allowed key give zeros."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    return probs @ v


def mask_from_candidates(idx, kv_len):
    """(B, H, Lq, Lk) bool: True where key j is one of the query's candidates (-1 slots select nothing)."""
    allowed = torch.zeros(*idx.shape[:3], kv_len + 1, dtype=torch.bool)
    allowed.scatter_(-1, torch.where(idx >= 0, idx.long(), kv_len), True)
    return allowed[..., :kv_len]


def causal_mask(q_len, kv_len):
    """(Lq, Lk) bool: query i (at key position i + Lk - Lq) sees keys j <= its position."""
    return torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)


def dense_swiglu(x, w_gate, w_up, w_down, unit_weight=None):
    """down(silu(gate x) * up x), optionally scaling each hidden unit by unit_weight (T, I) (0 masks it out)."""
    h = F.silu(x @ w_gate.T) * (x @ w_up.T)
    if unit_weight is not None:
        h = h * unit_weight
    return h @ w_down.T

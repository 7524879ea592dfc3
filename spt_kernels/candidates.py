"""Candidate selection: for every query, the keys that share the most PQ codes with it, under the causal mask.

Each query row gets a fixed budget of ceil(L_k / s) slots. The chosen keys are those with the largest
(matching codes, key index) pair, i.e. ties go to the most recent key, and they are listed in descending key order.

Optionally some keys are always kept (they outrank every code match): the query's own key and the sequence's first
`sink_keys` real keys. Pretrained LLMs park much of their attention mass on the first token ("attention sinks") and
on the current one, and PQ matching alone often misses both: on SmolLM2-135M (Cranfield, 256-token chunks,
s = 8) keeping them cuts the zero-shot loss increase over dense attention from +43% to +9%
(`benchmarks/results/spt.md`).
A row with fewer valid keys than slots (early rows of a causal mask, padded sequences) fills the rest with -1,
never with a real key, so the attention skips those slots instead of double-counting a key.
"""

import math

import torch

from .dispatch import check_dtype, use_triton

INVALID = -1  # index of an empty candidate slot
_CHUNK_ELEMENTS = 1 << 21  # reference path: score elements per chunk of query rows (bounds memory, no L x L tensor)


def candidate_budget(kv_len: int, sparsity: int) -> int:
    """Keys each query attends to: ceil(L_k / s)."""
    return math.ceil(kv_len / sparsity)


def select_candidates(
    q_codes: torch.Tensor,
    k_codes: torch.Tensor,
    budget: int,
    key_padding: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    sink_keys: int = 0,
    keep_self: bool = False,
) -> torch.Tensor:
    """Indices (B, H, Lq, budget) int32 of each query's candidate keys; -1 marks an empty slot.

    q_codes: (B, H, Lq, M) uint8; k_codes: (B, Hkv, Lk, M) uint8 with H a multiple of Hkv (grouped-query attention:
    query head h reads key head h // (H / Hkv)); key_padding: (B, Lk) bool, True for real tokens. Query row i sits at
    key position i + Lk - Lq, so queries may be the last Lq positions of a longer (cached) key sequence.
    sink_keys: the first this many real keys of each sequence are always kept; keep_self: each query's own key is
    always kept (both still within the budget and the causal and padding masks).
    """
    if q_codes.dim() != 4 or k_codes.dim() != 4:
        raise ValueError(f"codes must be 4D (B, H, L, M), got q {tuple(q_codes.shape)} and k {tuple(k_codes.shape)}")
    check_dtype("q_codes", q_codes, (torch.uint8,))
    check_dtype("k_codes", k_codes, (torch.uint8,))
    batch, heads, q_len, n_sub = q_codes.shape
    kv_batch, kv_heads, kv_len, kv_sub = k_codes.shape
    if kv_batch != batch or kv_sub != n_sub or heads % kv_heads:
        raise ValueError(
            f"q_codes {tuple(q_codes.shape)} and k_codes {tuple(k_codes.shape)} need equal B and M and H % Hkv == 0"
        )
    if q_len > kv_len:
        raise ValueError(f"more queries ({q_len}) than keys ({kv_len}): queries must be the last Lq key positions")
    if not 1 <= budget <= kv_len:
        raise ValueError(f"budget must be in [1, Lk={kv_len}], got {budget}")
    if key_padding is not None:
        check_dtype("key_padding", key_padding, (torch.bool,))
        if key_padding.shape != (batch, kv_len):
            raise ValueError(f"key_padding must be (B, Lk) = {(batch, kv_len)}, got {tuple(key_padding.shape)}")
    if sink_keys < 0:
        raise ValueError(f"sink_keys must be >= 0, got {sink_keys}")
    # Where each sequence's sinks start: its first real key (left padding shifts it).
    if key_padding is None:
        sink_start = torch.zeros(batch, dtype=torch.int32, device=q_codes.device)
    else:
        sink_start = key_padding.to(torch.uint8).argmax(dim=1).to(torch.int32)
    forced = (sink_start, sink_keys, keep_self)
    if use_triton(backend, q_codes, k_codes):
        from .triton_candidates import select_candidates_triton

        return select_candidates_triton(q_codes, k_codes, budget, key_padding, forced)
    return _select_candidates_reference(q_codes, k_codes, budget, key_padding, forced)


def _one_hot(codes: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Float one-hot of codes (..., M) -> (..., M * n_codes), built directly (no int64 intermediate)."""
    slots = codes.long() + torch.arange(codes.shape[-1], device=codes.device) * n_codes
    hot = torch.zeros(*codes.shape[:-1], codes.shape[-1] * n_codes, device=codes.device)
    return hot.scatter_(-1, slots, 1.0)


def _select_candidates_reference(q_codes, k_codes, budget, key_padding, forced):
    batch, heads, q_len, n_sub = q_codes.shape
    sink_start, sink_keys, keep_self = forced
    kv_heads, kv_len = k_codes.shape[1:3]
    group = heads // kv_heads
    n_codes = int(max(q_codes.max(), k_codes.max())) + 1
    # Matching-code counts as a matmul of one-hot codes: onehot(q) . onehot(k) = #subspaces with equal codes.
    q_codes = q_codes.view(batch, kv_heads, group, q_len, -1)
    k_hot_t = _one_hot(k_codes, n_codes).transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, M*C, Lk)
    key_pos = torch.arange(kv_len, device=q_codes.device)
    out = torch.empty(batch, heads, q_len, budget, dtype=torch.int32, device=q_codes.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * kv_len))
    for start in range(0, q_len, rows_per_chunk):
        stop = min(start + rows_per_chunk, q_len)
        matches = _one_hot(q_codes[:, :, :, start:stop], n_codes) @ k_hot_t  # (B, Hkv, G, rows, Lk), exact integers
        query_pos = torch.arange(start, stop, device=q_codes.device) + (kv_len - q_len)
        valid = (key_pos[None, :] <= query_pos[:, None]).expand(batch, -1, -1)  # (B, rows, Lk)
        if key_padding is not None:
            valid = valid & key_padding[:, None, :]
        sink = (key_pos >= sink_start[:, None]) & (key_pos < sink_start[:, None] + sink_keys)  # (B, Lk)
        keep = sink[:, None, :] | (keep_self & (key_pos[None, :] == query_pos[:, None]))  # (B, rows, Lk)
        matches.masked_fill_(keep[:, None, None], n_sub + 1)  # kept keys outrank any number of matching codes
        # One sortable number per key: matches first, key index breaks ties (recent wins); invalid keys sort last.
        rank = matches.mul_(kv_len).add_(key_pos).masked_fill_(~valid[:, None, None], -1.0)
        top, chosen = rank.topk(budget, dim=-1)
        chosen = torch.where(top >= 0, chosen, INVALID)
        chosen = chosen.sort(dim=-1, descending=True).values
        out[:, :, start:stop] = chosen.view(batch, heads, stop - start, budget).to(torch.int32)
    return out

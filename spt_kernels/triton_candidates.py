"""Triton kernel for candidate selection: exact top-`budget` keys per query by matching PQ codes, no L x L tensor.

Kept keys (the sinks and the query's own key) score M + 1, above any number of matches. Per block of query rows,
two passes over the causally visible keys:
1. count, for every score v = 0..M + 1, how many valid keys match the query in at least v subspaces; the threshold t is
   the largest v with at least `budget` such keys (0 when the row has fewer valid keys than slots);
2. walk the keys from the most recent to the oldest and write out every key scoring above t plus the first
   (budget - #above) keys scoring exactly t. That is the same set as the reference's top-k of (score, key index),
   written in the same descending key order.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _match_scores(
    qc_rows,
    kc_base,
    pad_base,
    offs_n,
    row_ok,
    last_key,
    kv_len,
    stride_kl,
    sink_lo,
    sink_hi,
    M: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEEP_SELF: tl.constexpr,
):
    """Scores (BM, BN) of the query rows against keys offs_n (matching codes; M + 1 for kept keys), and validity.

    One subspace at a time, so every tensor stays 2D (BM, BN) and in registers.
    """
    key_ok = offs_n < kv_len
    kc_rows = kc_base + offs_n * stride_kl  # (BN,) pointers to each key's codes
    score = tl.zeros((qc_rows.shape[0], offs_n.shape[0]), tl.int32)
    for m in tl.static_range(M):
        qc = tl.load(qc_rows + m, mask=row_ok, other=0)
        kc = tl.load(kc_rows + m, mask=key_ok, other=0)
        score += (qc[:, None] == kc[None, :]).to(tl.int32)
    keep = ((offs_n >= sink_lo) & (offs_n < sink_hi))[None, :] & row_ok[:, None]
    if KEEP_SELF:
        keep = keep | (offs_n[None, :] == last_key[:, None])
    score = tl.where(keep, M + 1, score)
    valid = row_ok[:, None] & key_ok[None, :] & (offs_n[None, :] <= last_key[:, None])
    if HAS_PAD:
        real = tl.load(pad_base + offs_n, mask=key_ok, other=0)
        valid = valid & (real != 0)[None, :]
    return score, valid


@triton.jit
def _select_kernel(
    qc_ptr,  # (B, H, Lq, M) uint8, last dim contiguous
    kc_ptr,  # (B, Hkv, Lk, M) uint8, last dim contiguous
    pad_ptr,  # (B, Lk) uint8, 1 = real token (unused unless HAS_PAD)
    sink_ptr,  # (B,) int32: position of each sequence's first real key
    out_ptr,  # (B, H, Lq, budget) int32, prefilled with -1
    q_len,
    kv_len,
    budget,
    sink_keys,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_pb,
    stride_ob, stride_oh, stride_ol,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    M: tl.constexpr,
    N_BINS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEEP_SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    qc_rows = qc_ptr + b * stride_qb + h * stride_qh + rows * stride_ql  # (BM,) pointers to each query's codes
    kc_base = kc_ptr + b * stride_kb + (h // GROUP) * stride_kh
    pad_base = pad_ptr + b * stride_pb
    sink_lo = tl.load(sink_ptr + b)
    sink_hi = sink_lo + sink_keys
    last_key = rows + (kv_len - q_len)  # causal limit (inclusive) of each row
    n_end = tl.minimum(kv_len, pid_m * BLOCK_M + BLOCK_M + (kv_len - q_len))  # no row of the block sees past this
    n_blocks = tl.cdiv(n_end, BLOCK_N)

    # Pass 1: at_least[r, v] = number of valid keys with score >= v, for v = 0..M + 1.
    bins = tl.arange(0, N_BINS)
    at_least = tl.zeros((BLOCK_M, N_BINS), tl.int32)
    for i in range(n_blocks):
        offs_n = i * BLOCK_N + tl.arange(0, BLOCK_N)
        score, valid = _match_scores(
            qc_rows, kc_base, pad_base, offs_n, row_ok, last_key, kv_len, stride_kl, sink_lo, sink_hi, M, HAS_PAD, KEEP_SELF
        )
        for v in tl.static_range(M + 2):
            count = tl.sum((valid & (score >= v)).to(tl.int32), axis=1)  # (BM,)
            at_least += tl.where(bins[None, :] == v, count[:, None], 0)
    # at_least is non-increasing in v, so the threshold is the number of v >= 1 that still reach the budget.
    thresh = tl.sum(((at_least >= budget) & (bins[None, :] >= 1)).to(tl.int32), axis=1)  # (BM,)
    above = tl.sum(tl.where(bins[None, :] == thresh[:, None] + 1, at_least, 0), axis=1)
    need_at_thresh = budget - above

    # Pass 2: newest keys first, so ties go to recent keys and the output is in descending key order.
    out_base = out_ptr + b * stride_ob + h * stride_oh + rows * stride_ol  # (BM,)
    filled = tl.zeros((BLOCK_M,), tl.int32)
    seen_at_thresh = tl.zeros((BLOCK_M,), tl.int32)
    for i in range(n_blocks):
        offs_n = (n_blocks - 1 - i) * BLOCK_N + (BLOCK_N - 1) - tl.arange(0, BLOCK_N)
        score, valid = _match_scores(
            qc_rows, kc_base, pad_base, offs_n, row_ok, last_key, kv_len, stride_kl, sink_lo, sink_hi, M, HAS_PAD, KEEP_SELF
        )
        tie = (valid & (score == thresh[:, None])).to(tl.int32)
        tie_rank = seen_at_thresh[:, None] + tl.cumsum(tie, axis=1) - tie  # earlier ties in this walk
        take = valid & ((score > thresh[:, None]) | ((tie != 0) & (tie_rank < need_at_thresh[:, None])))
        take_i = take.to(tl.int32)
        slot = filled[:, None] + tl.cumsum(take_i, axis=1) - take_i
        tl.store(out_base[:, None] + slot, offs_n[None, :] + tl.zeros_like(slot), mask=take)
        filled += tl.sum(take_i, axis=1)
        seen_at_thresh += tl.sum(tie, axis=1)


def select_candidates_triton(q_codes, k_codes, budget, key_padding, forced):
    """Triton twin of candidates._select_candidates_reference; same arguments, same output."""
    sink_start, sink_keys, keep_self = forced
    batch, heads, q_len, n_sub = q_codes.shape
    kv_heads, kv_len = k_codes.shape[1:3]
    q_codes = q_codes.contiguous()
    k_codes = k_codes.contiguous()
    out = torch.full((batch, heads, q_len, budget), -1, dtype=torch.int32, device=q_codes.device)
    pad = key_padding.to(torch.uint8).contiguous() if key_padding is not None else q_codes  # q_codes: unused dummy
    block_m, block_n = 16, 64
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _select_kernel[grid](
        q_codes, k_codes, pad, sink_start.contiguous(), out,
        q_len, kv_len, budget, sink_keys,
        *q_codes.stride()[:3],
        *k_codes.stride()[:3],
        pad.stride(0),
        *out.stride()[:3],
        H=heads,
        GROUP=heads // kv_heads,
        M=n_sub,
        N_BINS=triton.next_power_of_2(n_sub + 3),  # scores 0..M + 1, plus the v = M + 2 bin read for t = M + 1
        HAS_PAD=key_padding is not None,
        KEEP_SELF=keep_self,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out

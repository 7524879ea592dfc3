"""Sparse attention: each query attends only to its candidate keys (gather + softmax), forward and backward.

Shapes: q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H a multiple of Hkv (grouped-query attention: query head h uses
key/value head h // (H / Hkv)); idx (B, H, Lq, K) int32 candidate key indices, -1 for an empty slot.
Output (B, H, Lq, D). A query with no valid candidate (a padding row) outputs zeros and gets zero gradient.

Neither backend builds an L x L tensor: the Triton kernels keep one query row's candidates in registers, and the
PyTorch reference (the CPU path) processes query rows in chunks whose gathered keys fit a fixed element budget.
The backward recomputes the probabilities from the saved log-sum-exp, as flash attention does.
"""

import torch

from .dispatch import FLOAT_DTYPES, check_dtype, use_triton

_CHUNK_ELEMENTS = 1 << 21  # reference path: gathered (rows, K, D) elements per chunk of query rows


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(scale * q . k_j) weighted sum of v_j over the candidate keys j = idx[b, h, i, :] of each query."""
    _check_inputs(q, k, v, idx)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    triton_path = use_triton(backend, q, k, v, idx)
    if triton_path and q.dtype == torch.float64:
        raise TypeError("the triton sparse attention supports float16/bfloat16/float32, got float64")
    return _SparseAttention.apply(q, k, v, idx, scale, triton_path)


def _check_inputs(q, k, v, idx):
    for name, t in (("q", q), ("k", k), ("v", v), ("idx", idx)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4D, got shape {tuple(t.shape)}")
    check_dtype("q", q, FLOAT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_dtype("idx", idx, (torch.int32, torch.int64))
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != head_dim or heads % k.shape[1]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B, Hkv, Lk, D) with q {tuple(q.shape)} "
            "= (B, H, Lq, D) and H % Hkv == 0"
        )
    if idx.shape[:3] != (batch, heads, q_len):
        raise ValueError(f"idx must be (B, H, Lq, K) = {(batch, heads, q_len)} + (K,), got {tuple(idx.shape)}")


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale, triton_path):
        if triton_path:
            from .triton_sparse_attention import sparse_attention_forward_triton as forward
        else:
            forward = _forward_reference
        out, lse = forward(q, k, v, idx, scale)
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.scale = scale
        ctx.triton_path = triton_path
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, idx, out, lse = ctx.saved_tensors
        if ctx.triton_path:
            from .triton_sparse_attention import sparse_attention_backward_triton as backward
        else:
            backward = _backward_reference
        dq, dk, dv = backward(q, k, v, idx, out, lse, grad_out, ctx.scale)
        return dq, dk, dv, None, None, None


def _row_chunks(q, idx):
    """Query-row ranges whose gathered (B, H, rows, K, D) keys stay within the chunk element budget."""
    batch, heads, q_len, head_dim = q.shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * idx.shape[-1] * head_dim))
    return [(start, min(start + rows, q_len)) for start in range(0, q_len, rows)]


def _key_rows(idx_chunk, kv_heads, kv_len):
    """Row numbers (B, H, r, K) into k.reshape(-1, D) of the candidates; empty slots point at row 0 of their head."""
    batch, heads = idx_chunk.shape[:2]
    kv_head = torch.arange(heads, device=idx_chunk.device) // (heads // kv_heads)  # (H,)
    first_row = (torch.arange(batch, device=idx_chunk.device)[:, None] * kv_heads + kv_head) * kv_len  # (B, H)
    return idx_chunk.clamp_min(0).long() + first_row[:, :, None, None]


def _gather_rows(x_rows, rows):
    """x_rows[rows]: (N, D) rows picked by (B, H, r, K) row numbers -> (B, H, r, K, D); index_select is the fast copy."""
    return x_rows.index_select(0, rows.reshape(-1)).view(*rows.shape, x_rows.shape[-1])


def _scores(q_chunk, k_sel, scale):
    """scale * q . k over each row's candidates: (B, H, r, D) x (B, H, r, K, D) -> (B, H, r, K)."""
    return (k_sel @ q_chunk.unsqueeze(-1)).squeeze(-1) * scale


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_reference(q, k, v, idx, scale):
    batch, heads, _, head_dim = q.shape
    kv_heads, kv_len = k.shape[1:3]
    work = _compute_dtype(q.dtype)
    k_rows, v_rows = k.to(work).reshape(-1, head_dim), v.to(work).reshape(-1, head_dim)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=work, device=q.device)
    for start, stop in _row_chunks(q, idx):
        idx_c = idx[:, :, start:stop]
        valid = idx_c >= 0
        rows = _key_rows(idx_c, kv_heads, kv_len)  # (B, H, r, K)
        scores = _scores(q[:, :, start:stop].to(work), _gather_rows(k_rows, rows), scale)
        scores = scores.masked_fill(~valid, float("-inf"))
        lse_c = torch.logsumexp(scores, dim=-1)  # -inf on rows without candidates
        p = torch.where(valid, torch.exp(scores - lse_c[..., None]), 0.0)
        out[:, :, start:stop] = (p.unsqueeze(-2) @ _gather_rows(v_rows, rows)).squeeze(-2).to(q.dtype)
        lse[:, :, start:stop] = lse_c
    return out, lse


def _backward_reference(q, k, v, idx, out, lse, grad_out, scale):
    head_dim = q.shape[-1]
    kv_heads, kv_len = k.shape[1:3]
    work = _compute_dtype(q.dtype)
    k_rows, v_rows = k.to(work).reshape(-1, head_dim), v.to(work).reshape(-1, head_dim)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.numel() // head_dim, head_dim, dtype=work, device=k.device)  # rows of k.reshape(-1, D)
    dv = torch.zeros_like(dk)
    for start, stop in _row_chunks(q, idx):
        idx_c = idx[:, :, start:stop]
        valid = idx_c >= 0
        rows = _key_rows(idx_c, kv_heads, kv_len)
        q_c = q[:, :, start:stop].to(work)
        do_c = grad_out[:, :, start:stop].to(work)
        k_sel, v_sel = _gather_rows(k_rows, rows), _gather_rows(v_rows, rows)  # (B, H, r, K, D)
        scores = _scores(q_c, k_sel, scale)
        p = torch.where(valid, torch.exp(scores - lse[:, :, start:stop, None]), 0.0)  # zero on empty slots
        # softmax backward: dS = P * (dP - rowsum(dO * O)); the row sum may be negative and is used as is.
        delta = (do_c * out[:, :, start:stop].to(work)).sum(-1, keepdim=True)
        dp = (v_sel @ do_c.unsqueeze(-1)).squeeze(-1)
        ds = p * (dp - delta) * scale
        dq[:, :, start:stop] = (ds.unsqueeze(-2) @ k_sel).squeeze(-2).to(q.dtype)
        # Scatter the per-candidate gradients back onto their key rows (empty slots carry zeros).
        flat = rows.reshape(-1)
        dk.index_add_(0, flat, (ds.unsqueeze(-1) * q_c.unsqueeze(-2)).reshape(-1, head_dim))
        dv.index_add_(0, flat, (p.unsqueeze(-1) * do_c.unsqueeze(-2)).reshape(-1, head_dim))
    return dq, dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)

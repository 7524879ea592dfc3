"""Triton kernels for sparse attention over gathered candidate keys.

One program per (query row, batch x head). The row's candidate indices are read in blocks of BLOCK_K; the matching
key and value rows are gathered straight from global memory and folded into an online softmax (forward), so no
score matrix is ever stored. The backward recomputes the probabilities from the saved log-sum-exp, accumulates dQ
in registers and scatters dK, dV into float32 buffers with atomic adds (a key may be a candidate of many queries,
and of several query heads under grouped-query attention).
"""

import torch
import triton
import triton.language as tl

_BLOCK_K = 32


@triton.jit
def _sparse_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr,
    scale,
    n_slots,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_ib, stride_ih, stride_il,
    stride_ob, stride_oh, stride_ol,
    stride_lb, stride_lh,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + row * stride_ql + offs_d).to(tl.float32)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    v_base = v_ptr + b * stride_kb + (h // GROUP) * stride_kh
    idx_base = idx_ptr + b * stride_ib + h * stride_ih + row * stride_il

    m_i = float("-inf")  # running max of the scores
    l_i = 0.0  # running sum of exp(score - m_i)
    acc = tl.zeros((D,), tl.float32)
    for start in range(0, n_slots, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        key = tl.load(idx_base + offs_k, mask=offs_k < n_slots, other=-1)
        valid = key >= 0
        rows = key[:, None] * stride_kl + offs_d[None, :]
        k = tl.load(k_base + rows, mask=valid[:, None], other=0.0).to(tl.float32)  # (BLOCK_K, D)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all slots empty so far: keep exp() finite
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    has_keys = l_i > 0.0
    out = tl.where(has_keys, acc / tl.where(has_keys, l_i, 1.0), 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + row * stride_ol + offs_d, out.to(out_ptr.dtype.element_ty))
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + row, lse)


@triton.jit
def _sparse_attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr, dout_ptr,
    dq_ptr, dk_ptr, dv_ptr,
    scale,
    n_slots,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_ib, stride_ih, stride_il,
    stride_ob, stride_oh, stride_ol,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dql,
    stride_gb, stride_gh, stride_gl,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out and dout share strides, as do k and v; dk, dv are (B, Hkv, Lk, D) float32 buffers with strides stride_g*.
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_d = tl.arange(0, D)
    q_off = b * stride_qb + h * stride_qh + row * stride_ql + offs_d
    o_off = b * stride_ob + h * stride_oh + row * stride_ol + offs_d
    q = tl.load(q_ptr + q_off).to(tl.float32)
    dout = tl.load(dout_ptr + o_off).to(tl.float32)
    out = tl.load(out_ptr + o_off).to(tl.float32)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + row)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # empty row: every slot is masked below anyway
    delta = tl.sum(dout * out, axis=0)  # rowsum(dO * O): may be negative, used as is
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_kb + hk * stride_kh
    g_base = b * stride_gb + hk * stride_gh
    idx_base = idx_ptr + b * stride_ib + h * stride_ih + row * stride_il

    dq = tl.zeros((D,), tl.float32)
    for start in range(0, n_slots, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        key = tl.load(idx_base + offs_k, mask=offs_k < n_slots, other=-1)
        valid = key >= 0
        rows = key[:, None] * stride_kl + offs_d[None, :]
        k = tl.load(k_base + rows, mask=valid[:, None], other=0.0).to(tl.float32)  # (BLOCK_K, D)
        v = tl.load(v_base + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        p = tl.where(valid, tl.exp(s - lse), 0.0)
        dp = tl.sum(v * dout[None, :], axis=1)
        ds = p * (dp - delta) * scale
        dq += tl.sum(ds[:, None] * k, axis=0)
        g_rows = g_base + key[:, None] * stride_gl + offs_d[None, :]
        tl.atomic_add(dk_ptr + g_rows, ds[:, None] * q[None, :], mask=valid[:, None])
        tl.atomic_add(dv_ptr + g_rows, p[:, None] * dout[None, :], mask=valid[:, None])
    dq_off = b * stride_dqb + h * stride_dqh + row * stride_dql + offs_d
    tl.store(dq_ptr + dq_off, dq.to(dq_ptr.dtype.element_ty))


def _check_triton_inputs(q):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton sparse attention supports float16/bfloat16/float32, got {q.dtype}")
    head_dim = q.shape[-1]
    if head_dim & (head_dim - 1):
        raise ValueError(f"triton sparse attention needs a power-of-two head dim, got {head_dim}")


def _last_dim_contiguous(*tensors):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def sparse_attention_forward_triton(q, k, v, idx, scale):
    """(out (B, H, Lq, D), lse (B, H, Lq) float32) of sparse attention; see sparse_attention.py for the contract."""
    _check_triton_inputs(q)
    k, v = k.contiguous(), v.contiguous()  # one stride set for both
    q, idx = _last_dim_contiguous(q, idx)
    batch, heads, q_len, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    grid = (q_len, batch * heads)
    _sparse_attn_fwd_kernel[grid](
        q, k, v, idx, out, lse,
        scale,
        idx.shape[-1],
        *q.stride()[:3],
        *k.stride()[:3],
        *idx.stride()[:3],
        *out.stride()[:3],
        *lse.stride()[:2],
        H=heads,
        GROUP=heads // k.shape[1],
        D=head_dim,
        BLOCK_K=_BLOCK_K,
    )
    return out, lse


def sparse_attention_backward_triton(q, k, v, idx, out, lse, grad_out, scale):
    """(dq, dk, dv) of sparse attention given the forward's out and lse."""
    k, v = k.contiguous(), v.contiguous()
    q, idx = _last_dim_contiguous(q, idx)
    grad_out = grad_out.contiguous()  # same strides as out, which the forward allocated contiguous
    batch, heads, q_len, head_dim = q.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    grid = (q_len, batch * heads)
    _sparse_attn_bwd_kernel[grid](
        q, k, v, idx, out, lse, grad_out,
        dq, dk, dv,
        scale,
        idx.shape[-1],
        *q.stride()[:3],
        *k.stride()[:3],
        *idx.stride()[:3],
        *out.stride()[:3],
        *lse.stride()[:2],
        *dq.stride()[:3],
        *dk.stride()[:3],
        H=heads,
        GROUP=heads // k.shape[1],
        D=head_dim,
        BLOCK_K=_BLOCK_K,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)

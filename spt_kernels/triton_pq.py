"""Triton kernel for product-quantisation encoding: nearest codeword per subspace, without a (rows, M, C) tensor."""

import torch
import triton
import triton.language as tl


@triton.jit
def _pq_encode_kernel(
    x_ptr,  # (N, M * SUB) float, row-major
    codebook_ptr,  # (M, C, SUB) float32, contiguous
    codes_ptr,  # (N, M) uint8 out
    n_rows,
    M: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, M)
    offs_s = tl.arange(0, SUB)
    row_ok = rows < n_rows
    col = offs_m[:, None] * SUB + offs_s[None, :]  # (M, SUB) column of each element in a row
    x = tl.load(x_ptr + rows[:, None, None] * (M * SUB) + col[None, :, :], mask=row_ok[:, None, None], other=0.0)
    x = x.to(tl.float32)  # (R, M, SUB)
    best = tl.full((BLOCK_R, M), float("inf"), tl.float32)
    best_code = tl.zeros((BLOCK_R, M), tl.int32)
    for c in range(C):
        word = tl.load(codebook_ptr + offs_m[:, None] * (C * SUB) + c * SUB + offs_s[None, :])  # (M, SUB)
        diff = x - word[None, :, :]
        dist = tl.sum(diff * diff, axis=2)  # (R, M)
        closer = dist < best  # strict: ties keep the lower codeword, like torch.argmin
        best = tl.where(closer, dist, best)
        best_code = tl.where(closer, c, best_code)
    tl.store(codes_ptr + rows[:, None] * M + offs_m[None, :], best_code.to(tl.uint8), mask=row_ok[:, None])


def pq_encode_triton(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, M) of rows (N, D) under codebook (M, C, d); M and d must be powers of two."""
    n_sub, n_codes, sub_dim = codebook.shape
    if rows.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton pq_encode supports float16/bfloat16/float32 vectors, got {rows.dtype}")
    if n_sub & (n_sub - 1) or sub_dim & (sub_dim - 1):
        raise ValueError(f"triton pq_encode needs power-of-two M and d, got M={n_sub}, d={sub_dim}")
    rows = rows.contiguous()
    codebook = codebook.float().contiguous()
    codes = torch.empty(rows.shape[0], n_sub, dtype=torch.uint8, device=rows.device)
    block_r = 32
    grid = (triton.cdiv(rows.shape[0], block_r),)
    _pq_encode_kernel[grid](rows, codebook, codes, rows.shape[0], M=n_sub, C=n_codes, SUB=sub_dim, BLOCK_R=block_r)
    return codes

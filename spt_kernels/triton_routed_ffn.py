"""Triton grouped GEMMs for the routed FFN: the rows of a (P, K) matrix are sorted into G contiguous groups
(offsets), and group g is multiplied by its own matrix b[g].

- grouped_matmul_triton:    out[rows of g] = a[rows of g] @ b[g]         (forward, dX, dH)
- grouped_matmul_tn_triton: out[g] = a[rows of g].T @ c[rows of g]       (weight gradients, per block)

b and out are 3D strided views of the nn.Linear weights (see routed_ffn._block_views), so no weight is copied.
Row tiles never straddle two groups: a tile table (group, first row) is built on the device from the offsets,
sized by the static bound cdiv(P, BLOCK_M) + G, so launching needs no host synchronisation.
"""

import torch
import triton
import triton.language as tl

_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32


@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, out_ptr,
    tile_group_ptr, tile_row_ptr, offsets_ptr,
    n_cols, depth, n_groups,
    stride_am, stride_ak,
    stride_bg, stride_bk, stride_bn,
    stride_om, stride_on,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.load(tile_group_ptr + tile)
    used = group < n_groups  # the tile table is padded with unused tiles (group == n_groups)
    group = tl.where(used, group, 0)
    row_end = tl.where(used, tl.load(offsets_ptr + group + 1), 0)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < depth
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + group * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(a, b, input_precision=PRECISION)
    out = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_mm_tn_kernel(
    a_ptr, c_ptr, out_ptr, offsets_ptr,
    n_out_rows, n_cols,
    stride_am, stride_ak,
    stride_cm, stride_cn,
    stride_og, stride_ok, stride_on,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    group = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < n_out_rows
    col_ok = cols < n_cols
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)  # an empty group writes zeros
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < end
        a_t = tl.load(
            a_ptr + rs[None, :] * stride_am + ks[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0
        )  # (BLOCK_K, BLOCK_R): the segment's rows of a, transposed
        c = tl.load(
            c_ptr + rs[:, None] * stride_cm + cols[None, :] * stride_cn, mask=r_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc += tl.dot(a_t, c, input_precision=PRECISION)
    out = out_ptr + group * stride_og + ks[:, None] * stride_ok + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products (as torch.matmul by default); half types use tensor cores as is."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton grouped matmul supports float16/bfloat16/float32, got {dtype}")
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_table(offsets: torch.Tensor, n_rows: int, block_m: int):
    """(group, first row) of every BLOCK_M row tile; padded to the static bound with group = G."""
    n_groups = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(n_rows, block_m) + n_groups
    t = torch.arange(max_tiles, device=offsets.device)
    group = torch.searchsorted(tile_end, t, right=True)
    safe = group.clamp(max=n_groups - 1)
    first_row = offsets[safe] + (t - (tile_end - tiles)[safe]) * block_m
    return group.to(torch.int32), first_row.to(torch.int32), max_tiles


def grouped_matmul_triton(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[rows of group g] = a[rows of g] @ b[g]; a (P, K), b (G, K, N) any strides, offsets (G+1,) int64."""
    if b.dtype != a.dtype:
        raise TypeError(f"a ({a.dtype}) and b ({b.dtype}) must share a dtype")
    n_rows, depth = a.shape
    n_groups, _, n_cols = b.shape
    out = torch.empty(n_rows, n_cols, dtype=a.dtype, device=a.device)
    tile_group, tile_row, max_tiles = _tile_table(offsets, n_rows, _BLOCK_M)
    grid = (max_tiles, triton.cdiv(n_cols, _BLOCK_N))
    _grouped_mm_kernel[grid](
        a, b, out,
        tile_group, tile_row, offsets,
        n_cols, depth, n_groups,
        *a.stride(),
        *b.stride(),
        *out.stride(),
        PRECISION=_precision(a.dtype),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return out


def grouped_matmul_tn_triton(a: torch.Tensor, c: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """out[g] = a[rows of g].T @ c[rows of g]; a (P, K), c (P, N), out (G, K, N) any strides, written in place."""
    if c.dtype != a.dtype or out.dtype != a.dtype:
        raise TypeError(f"a ({a.dtype}), c ({c.dtype}) and out ({out.dtype}) must share a dtype")
    n_groups, n_out_rows, n_cols = out.shape
    grid = (n_groups, triton.cdiv(n_out_rows, _BLOCK_M), triton.cdiv(n_cols, _BLOCK_N))
    _grouped_mm_tn_kernel[grid](
        a, c, out, offsets,
        n_out_rows, n_cols,
        *a.stride(),
        *c.stride(),
        *out.stride(),
        PRECISION=_precision(a.dtype),
        BLOCK_K=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_R=_BLOCK_K,
    )

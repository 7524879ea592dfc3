"""Routed FFN: the gated (SwiGLU) FFN's hidden units split into n blocks; each token runs through k of them.

    y = sum over the token's chosen blocks b of  gate_b * W_down[:, b] (silu(W_gate[b] x) * W_up[b] x)

A linear router scores the n blocks per token; the top-k are run. The gate has value exactly 1 and carries the
router's gradient: gate_b = exp(log p_b - stop_grad(log p_b)) with p = softmax(router logits). So the forward is
precisely the dense FFN with the other blocks masked out (k = n gives the dense FFN, which is what the pretrained model computes),
while d loss / d logits = sum_b (d loss / d gate_b) d log p_b / d logits teaches the router which blocks help.

Tokens are grouped by block (a stable sort of the (token, block) pairs) and each block's tokens are multiplied
with that block's weight slices as one grouped GEMM, forward and backward; only the k/n chosen fraction of the
FFN's FLOPs is spent.
"""

import torch
import torch.nn.functional as F

from .dispatch import FLOAT_DTYPES, check_dtype, use_triton


def route_tokens(router_logits: torch.Tensor, active_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k blocks (T, k) int64 of each token and their gates (T, k): value 1, gradient of log-softmax."""
    work = torch.float32 if router_logits.dtype in (torch.float16, torch.bfloat16) else router_logits.dtype
    log_probs = torch.log_softmax(router_logits.to(work), dim=-1)
    top, blocks = log_probs.topk(active_blocks, dim=-1)
    gate = torch.exp(top - top.detach())  # in log space: p / stop_grad(p) is 0/0 once a chosen p underflows
    return blocks, gate


def routed_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    blocks: torch.Tensor,
    gate: torch.Tensor,
    n_blocks: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Routed SwiGLU FFN of tokens x (T, hidden) -> (T, hidden).

    w_gate, w_up: (I, hidden) and w_down: (hidden, I), as in nn.Linear; block b owns hidden units
    [b * I/n, (b+1) * I/n). blocks: (T, k) block ids per token, distinct within a row; gate: (T, k) their weights.
    """
    check_dtype("x", x, FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be (T, hidden), got shape {tuple(x.shape)}")
    tokens, hidden = x.shape
    inner = w_gate.shape[0]
    if w_gate.shape != (inner, hidden) or w_up.shape != (inner, hidden) or w_down.shape != (hidden, inner):
        raise ValueError(
            f"expected w_gate, w_up (I, {hidden}) and w_down ({hidden}, I); got {tuple(w_gate.shape)}, "
            f"{tuple(w_up.shape)}, {tuple(w_down.shape)}"
        )
    if inner % n_blocks:
        raise ValueError(f"FFN width {inner} is not divisible into {n_blocks} blocks")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} differs from x dtype {x.dtype}")
    if blocks.dim() != 2 or blocks.shape[0] != tokens or gate.shape != blocks.shape:
        raise ValueError(
            f"blocks and gate must both be (T={tokens}, k), got {tuple(blocks.shape)} and {tuple(gate.shape)}"
        )
    check_dtype("blocks", blocks, (torch.int32, torch.int64))
    triton_path = use_triton(backend, x, w_gate, w_up, w_down)
    return _RoutedFFN.apply(x, w_gate, w_up, w_down, blocks, gate.to(x.dtype), n_blocks, triton_path)


def _group_by_block(blocks: torch.Tensor, n_blocks: int):
    """Sort the T*k (token, block) pairs by block: (order into the flat pairs, token of each sorted pair, offsets)."""
    flat = blocks.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # (P,)
    token = order // blocks.shape[1]
    counts = torch.bincount(flat, minlength=n_blocks)
    offsets = torch.zeros(n_blocks + 1, dtype=torch.int64, device=blocks.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, token, offsets


def grouped_matmul_reference(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[rows of group g] = a[rows of group g] @ b[g]. a (P, K); b (G, K, N), any strides; offsets (G+1,)."""
    out = a.new_empty(a.shape[0], b.shape[2])
    bounds = offsets.tolist()
    for g in range(b.shape[0]):
        out[bounds[g] : bounds[g + 1]] = a[bounds[g] : bounds[g + 1]] @ b[g]
    return out


def grouped_matmul_tn_reference(a: torch.Tensor, c: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """out[g] = a[rows of g].T @ c[rows of g], written into out (G, K, N), typically a strided view of a weight grad."""
    bounds = offsets.tolist()
    for g in range(out.shape[0]):
        out[g] = a[bounds[g] : bounds[g + 1]].T @ c[bounds[g] : bounds[g + 1]]


def _kernels(triton_path: bool):
    if triton_path:
        from .triton_routed_ffn import grouped_matmul_tn_triton, grouped_matmul_triton

        return grouped_matmul_triton, grouped_matmul_tn_triton
    return grouped_matmul_reference, grouped_matmul_tn_reference


def _block_views(w_gate, w_up, w_down, n_blocks):
    """Per-block weights: gate/up (n, I/n, hidden) and down (n, I/n, hidden) as down[:, block].T; views (no copies)
    of contiguous nn.Linear weights."""
    inner, hidden = w_gate.shape
    width = inner // n_blocks
    return (
        w_gate.reshape(n_blocks, width, hidden),
        w_up.reshape(n_blocks, width, hidden),
        w_down.reshape(hidden, n_blocks, width).permute(1, 2, 0),
    )


class _RoutedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, blocks, gate, n_blocks, triton_path):
        matmul, _ = _kernels(triton_path)
        order, token, offsets = _group_by_block(blocks, n_blocks)
        wg, wu, wd = _block_views(w_gate, w_up, w_down, n_blocks)
        xs = x[token]  # (P, hidden): each token once per chosen block, grouped by block
        pre_gate = matmul(xs, wg.transpose(1, 2), offsets)  # (P, I/n)
        pre_up = matmul(xs, wu.transpose(1, 2), offsets)
        ys = matmul(F.silu(pre_gate) * pre_up, wd, offsets)  # (P, hidden)
        gate_sorted = gate.reshape(-1)[order]
        y = torch.zeros_like(x).index_add_(0, token, ys * gate_sorted[:, None])
        ctx.save_for_backward(x, w_gate, w_up, w_down, order, token, offsets, pre_gate, pre_up, gate_sorted)
        ctx.n_blocks, ctx.triton_path, ctx.gate_shape = n_blocks, triton_path, gate.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, order, token, offsets, pre_gate, pre_up, gate_sorted = ctx.saved_tensors
        matmul, matmul_tn = _kernels(ctx.triton_path)
        need_x, need_wg, need_wu, need_wd, _, need_gate = ctx.needs_input_grad[:6]
        wg, wu, wd = _block_views(w_gate, w_up, w_down, ctx.n_blocks)
        dys = dy[token]  # (P, hidden)
        sig = torch.sigmoid(pre_gate)
        act = pre_gate * sig
        h = act * pre_up  # (P, I/n)
        dh_ungated = matmul(dys, wd.transpose(1, 2), offsets)  # (P, I/n) = dys @ W_down[:, block]
        grads = dict.fromkeys(("x", "w_gate", "w_up", "w_down", "gate"))
        if need_gate:
            d_gate_sorted = (dh_ungated * h).sum(-1)  # = dys . ys without keeping ys
            grads["gate"] = torch.empty_like(d_gate_sorted).index_copy_(0, order, d_gate_sorted).view(ctx.gate_shape)
        dh = dh_ungated * gate_sorted[:, None]
        d_pre_gate = dh * pre_up * sig * (1 + pre_gate * (1 - sig))  # silu'(z) = sig(z) (1 + z (1 - sig(z)))
        d_pre_up = dh * act
        if need_x:
            dxs = matmul(d_pre_gate, wg, offsets) + matmul(d_pre_up, wu, offsets)  # (P, hidden)
            grads["x"] = torch.zeros_like(x).index_add_(0, token, dxs)
        n, hidden = ctx.n_blocks, x.shape[1]
        if need_wg or need_wu:
            xs = x[token]
        if need_wg:  # per block: dW_gate[block] = d_pre_gate[rows].T @ xs[rows]
            grads["w_gate"] = torch.empty_like(w_gate)
            matmul_tn(d_pre_gate, xs, offsets, grads["w_gate"].view(n, -1, hidden))
        if need_wu:
            grads["w_up"] = torch.empty_like(w_up)
            matmul_tn(d_pre_up, xs, offsets, grads["w_up"].view(n, -1, hidden))
        if need_wd:  # per block: dW_down[:, block] = (gate * dys)[rows].T @ h[rows]
            grads["w_down"] = torch.empty_like(w_down)
            matmul_tn(dys * gate_sorted[:, None], h, offsets, grads["w_down"].view(hidden, n, -1).transpose(0, 1))
        return grads["x"], grads["w_gate"], grads["w_up"], grads["w_down"], None, grads["gate"], None, None

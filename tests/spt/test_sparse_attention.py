"""Sparse attention (reference path) equals dense attention restricted to the candidates, values and gradients."""

import importlib
import pytest
import torch
import torch.nn.functional as F

from spt_kernels import candidate_budget, select_candidates, sparse_attention
from spt_references import causal_mask, dense_attention, mask_from_candidates


def make_inputs(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype=torch.float64):
    q = torch.randn(batch, heads, q_len, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, requires_grad=True)
    return q, k, v


def candidates(batch, heads, kv_heads, q_len, kv_len, sparsity, key_padding=None):
    q_codes = torch.randint(0, 4, (batch, heads, q_len, 4), dtype=torch.uint8)
    k_codes = torch.randint(0, 4, (batch, kv_heads, kv_len, 4), dtype=torch.uint8)
    return select_candidates(q_codes, k_codes, candidate_budget(kv_len, sparsity), key_padding, backend="reference")


def values_and_grads(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len", [(4, 2, 24, 24), (2, 2, 5, 19), (6, 3, 17, 17)])
def test_equals_dense_attention_on_the_selected_keys(heads, kv_heads, q_len, kv_len):
    key_padding = torch.ones(2, kv_len, dtype=torch.bool)
    key_padding[0, :3] = False
    idx = candidates(2, heads, kv_heads, q_len, kv_len, sparsity=4, key_padding=key_padding)
    inputs = make_inputs(2, heads, kv_heads, q_len, kv_len, 16)
    grad_out = torch.randn(2, heads, q_len, 16, dtype=torch.float64)
    scale = 0.3
    got = values_and_grads(lambda q, k, v: sparse_attention(q, k, v, idx, scale, backend="reference"), inputs, grad_out)
    allowed = mask_from_candidates(idx, kv_len)
    want = values_and_grads(lambda q, k, v: dense_attention(q, k, v, allowed, scale), inputs, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_sparsity_one_is_dense_causal_attention():
    q, k, v = make_inputs(2, 4, 2, 32, 32, 16, dtype=torch.float32)
    idx = candidates(2, 4, 2, 32, 32, sparsity=1)
    got = sparse_attention(q, k, v, idx, backend="reference")
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sparsity_one_with_cached_keys_is_dense_causal_attention():
    q, k, v = make_inputs(1, 2, 1, 3, 11, 8)  # 3 new queries on 11 keys, as in cached decoding
    idx = candidates(1, 2, 1, 3, 11, sparsity=1)
    allowed = causal_mask(3, 11).expand(1, 2, 3, 11)
    want = dense_attention(q, k, v, allowed, 8**-0.5)
    torch.testing.assert_close(sparse_attention(q, k, v, idx, backend="reference"), want)


def test_gradients_with_negative_softmax_row_sums():
    """rowsum(dO * O) is negative for many rows here; the backward must use it unclamped."""
    q, k, v = make_inputs(1, 2, 2, 16, 16, 8)
    idx = candidates(1, 2, 2, 16, 16, sparsity=2)
    with torch.no_grad():
        out = sparse_attention(q, k, v, idx, backend="reference")
    grad_out = -out * torch.rand_like(out) + 0.1 * torch.randn_like(out)
    assert ((grad_out * out).sum(-1) < 0).float().mean() > 0.5
    got = values_and_grads(lambda q, k, v: sparse_attention(q, k, v, idx, backend="reference"), [q, k, v], grad_out)
    allowed = mask_from_candidates(idx, 16)
    want = values_and_grads(lambda q, k, v: dense_attention(q, k, v, allowed, 8**-0.5), [q, k, v], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_gradcheck_float64():
    key_padding = torch.tensor([[False, True, True, True, True, True, True]])
    idx = candidates(1, 2, 1, 7, 7, sparsity=2, key_padding=key_padding)
    inputs = make_inputs(1, 2, 1, 7, 7, 4)
    assert torch.autograd.gradcheck(lambda q, k, v: sparse_attention(q, k, v, idx, backend="reference"), inputs)


def test_rows_without_candidates_give_zero_output_and_gradient():
    q, k, v = make_inputs(1, 1, 1, 4, 4, 8)
    idx = torch.tensor([[[[-1, -1], [1, -1], [2, 0], [-1, -1]]]], dtype=torch.int32)
    out = sparse_attention(q, k, v, idx, backend="reference")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[0, 0, [0, 3]] == 0).all() and (q.grad[0, 0, [0, 3]] == 0).all()
    assert (k.grad[0, 0, 3] == 0).all() and (v.grad[0, 0, 3] == 0).all()  # key 3 was never a candidate


def test_chunked_reference_matches_unchunked(monkeypatch):
    """The reference splits query rows into chunks to bound memory; chunk boundaries must not change results."""
    module = importlib.import_module("spt_kernels.sparse_attention")  # the package re-exports a same-named function

    q, k, v = make_inputs(1, 2, 1, 20, 20, 8)
    idx = candidates(1, 2, 1, 20, 20, sparsity=3)
    grad_out = torch.randn(1, 2, 20, 8, dtype=torch.float64)
    run = lambda q, k, v: sparse_attention(q, k, v, idx, backend="reference")  # noqa: E731
    whole = values_and_grads(run, [q, k, v], grad_out)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 2 * 7 * 8 * 3)  # three query rows per chunk
    chunked = values_and_grads(run, [q, k, v], grad_out)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_errors_name_the_bad_input():
    q, k, v = make_inputs(1, 4, 2, 6, 6, 8)
    idx = candidates(1, 4, 2, 6, 6, sparsity=2)
    with pytest.raises(TypeError, match="share a dtype"):
        sparse_attention(q, k.float(), v, idx)
    with pytest.raises(ValueError, match="idx"):
        sparse_attention(q, k, v, idx[:, :2])
    with pytest.raises(ValueError, match="H % Hkv"):
        sparse_attention(q, k[:, :1].expand(1, 3, 6, 8), v[:, :1].expand(1, 3, 6, 8), idx)
    with pytest.raises(TypeError, match="idx"):
        sparse_attention(q, k, v, idx.float())

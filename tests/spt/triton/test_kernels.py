"""Triton kernels against the PyTorch reference, on random inputs.

On a CUDA machine these run on the GPU (float32, float16, bfloat16). Without CUDA they need Triton's CPU
interpreter, which triton reads from TRITON_INTERPRET when a kernel is defined, i.e. before spt_kernels' triton
modules are imported: tests/spt/test_triton_interpreter.py reruns this file in a fresh process with it set.
The interpreter computes with numpy, so there only float32 and float16 are checked, on small shapes.
"""

import os

import pytest
import torch

from spt_kernels import (
    SPTConfig,
    candidate_budget,
    patch_model,
    pq_encode,
    route_tokens,
    routed_ffn,
    select_candidates,
    sparse_attention,
)

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1 (run by test_triton_interpreter.py)"
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(got, want, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


def test_pq_encode():
    x = torch.randn(2, 4, 37, 64, device=DEVICE)
    codebook = torch.randn(8, 16, 8, device=DEVICE)
    assert torch.equal(pq_encode(x, codebook, "triton"), pq_encode(x, codebook, "reference"))


@pytest.mark.parametrize(
    "heads,kv_heads,q_len,kv_len,n_sub,sparsity", [(4, 2, 40, 40, 4, 4), (2, 1, 7, 50, 8, 4), (2, 2, 33, 33, 16, 1)]
)
def test_select_candidates(heads, kv_heads, q_len, kv_len, n_sub, sparsity):
    q_codes = torch.randint(0, 3, (2, heads, q_len, n_sub), dtype=torch.uint8, device=DEVICE)
    k_codes = torch.randint(0, 3, (2, kv_heads, kv_len, n_sub), dtype=torch.uint8, device=DEVICE)
    key_padding = torch.rand(2, kv_len, device=DEVICE) > 0.2
    budget = candidate_budget(kv_len, sparsity)
    for padding in (None, key_padding):
        for forced in ({}, {"sink_keys": 2, "keep_self": True}):
            got = select_candidates(q_codes, k_codes, budget, padding, "triton", **forced)
            assert torch.equal(got, select_candidates(q_codes, k_codes, budget, padding, "reference", **forced))


def attention_case(dtype, heads, kv_heads, q_len, kv_len, head_dim):
    # q laid out (B, Lq, H, D) and viewed as (B, H, Lq, D), as transformers hands it over: not contiguous.
    q = torch.randn(2, q_len, heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    q_codes = torch.randint(0, 3, (2, heads, q_len, 4), dtype=torch.uint8, device=DEVICE)
    k_codes = torch.randint(0, 3, (2, kv_heads, kv_len, 4), dtype=torch.uint8, device=DEVICE)
    key_padding = torch.ones(2, kv_len, dtype=torch.bool, device=DEVICE)
    key_padding[1, :4] = False  # rows 0-3 of sequence 1 have no candidates at all
    idx = select_candidates(q_codes, k_codes, candidate_budget(kv_len, 3), key_padding, "reference")
    return q, k, v, idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,head_dim", [(4, 2, 12, 12, 16), (2, 1, 4, 13, 32)])
def test_sparse_attention_forward_and_backward(dtype, heads, kv_heads, q_len, kv_len, head_dim):
    q, k, v, idx = attention_case(dtype, heads, kv_heads, q_len, kv_len, head_dim)
    grad_out = torch.randn_like(q)
    results = []
    for backend in ("triton", "reference"):
        q.grad = k.grad = v.grad = None
        out = sparse_attention(q, k, v, idx, backend=backend)
        out.backward(grad_out)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for got, want in zip(*results):
        assert got.dtype == dtype
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_blocks,active", [(4, 2), (4, 4)])
def test_routed_ffn_forward_and_backward(dtype, n_blocks, active):
    tokens, hidden, inner = 45, 32, 128
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
    weights = [
        (torch.randn(shape, device=DEVICE, dtype=dtype) * 0.2).requires_grad_()
        for shape in ((inner, hidden), (inner, hidden), (hidden, inner))
    ]
    logits = torch.randn(tokens, n_blocks, device=DEVICE, requires_grad=True)
    logits.data[:, 0] += 5  # block 0 chosen by all, some block by few: uneven groups
    grad_out = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype)
    leaves = [x, *weights, logits]
    results = []
    for backend in ("triton", "reference"):
        for t in leaves:
            t.grad = None
        blocks, gate = route_tokens(logits, active)
        y = routed_ffn(x, *weights, blocks, gate, n_blocks, backend)
        y.backward(grad_out)
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert_close(got, want, dtype)  # the float32 router-logit gradient inherits the FFN dtype's rounding


def test_routed_ffn_with_an_empty_block():
    x = torch.randn(9, 32, device=DEVICE, requires_grad=True)
    weights = [torch.randn(s, device=DEVICE, requires_grad=True) for s in ((64, 32), (64, 32), (32, 64))]
    blocks = torch.zeros(9, 1, dtype=torch.int64, device=DEVICE)  # blocks 1..3 get no tokens
    gate = torch.ones(9, 1, device=DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        for w in weights:
            w.grad = None
        routed_ffn(x, *weights, blocks, gate, 4, backend).sum().backward()
        grads.append([w.grad.clone() for w in weights])
    for got, want in zip(*grads):
        assert_close(got, want, torch.float32)
    assert (grads[0][0][16:] == 0).all()


def test_patched_model_triton_matches_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = patch_model(LlamaForCausalLM(config).to(DEVICE), SPTConfig(sparsity=4, backend="reference"))
    ids = torch.randint(0, 64, (1, 16), device=DEVICE)
    model.train()  # one training forward initialises and updates the codebooks
    model(input_ids=ids)
    model.eval()
    outputs = []
    for backend in ("reference", "triton"):
        for module in model.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    assert_close(outputs[1], outputs[0], torch.float32)

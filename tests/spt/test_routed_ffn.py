"""Routed FFN (reference path) equals the dense SwiGLU FFN with unchosen blocks masked, values and gradients."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from spt_kernels import route_tokens, routed_ffn
from spt_kernels.routed_mlp import RoutedMLP
from spt_references import dense_swiglu

TOKENS, HIDDEN, INNER = 23, 16, 48


def make_weights(dtype=torch.float64):
    scale = HIDDEN**-0.5
    return [
        (torch.randn(INNER, HIDDEN, dtype=dtype) * scale).requires_grad_(),
        (torch.randn(INNER, HIDDEN, dtype=dtype) * scale).requires_grad_(),
        (torch.randn(HIDDEN, INNER, dtype=dtype) * scale).requires_grad_(),
    ]


def unit_weights(blocks, gate, n_blocks):
    """(T, I) weight of every hidden unit: its block's gate if the block was chosen, else 0."""
    per_block = torch.zeros(blocks.shape[0], n_blocks, dtype=gate.dtype).scatter(1, blocks, gate)
    return per_block.repeat_interleave(INNER // n_blocks, dim=1)


def values_and_grads(fn, leaves, grad_out):
    for t in leaves:
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return [out.detach()] + [t.grad.clone() for t in leaves]


def test_all_blocks_active_is_the_dense_ffn():
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64, requires_grad=True)
    weights = make_weights()
    logits = torch.randn(TOKENS, 4, dtype=torch.float64)
    grad_out = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    blocks, gate = route_tokens(logits, 4)
    routed = lambda: routed_ffn(x, *weights, blocks, gate, 4, backend="reference")  # noqa: E731
    got = values_and_grads(routed, [x, *weights], grad_out)
    want = values_and_grads(lambda: dense_swiglu(x, *weights), [x, *weights], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("n_blocks,active", [(4, 2), (4, 1), (6, 3)])
def test_top_k_equals_dense_ffn_with_other_blocks_masked(n_blocks, active):
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64, requires_grad=True)
    weights = make_weights()
    logits = torch.randn(TOKENS, n_blocks, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    leaves = [x, *weights, logits]

    def routed():
        blocks, gate = route_tokens(logits, active)
        return routed_ffn(x, *weights, blocks, gate, n_blocks, backend="reference")

    def masked_dense():
        blocks, gate = route_tokens(logits, active)
        return dense_swiglu(x, *weights, unit_weights(blocks, gate, n_blocks))

    got, want = values_and_grads(routed, leaves, grad_out), values_and_grads(masked_dense, leaves, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert got[-1].abs().sum() > 0, "the router must receive a gradient through the gate"


def test_gate_is_one_and_router_gradient_is_a_log_softmax_gradient():
    logits = torch.randn(5, 4, requires_grad=True)
    blocks, gate = route_tokens(logits, 2)
    assert torch.equal(gate.detach(), torch.ones(5, 2))
    assert torch.equal(blocks, logits.detach().topk(2).indices)
    upstream = torch.randn(5, 2)
    (gate * upstream).sum().backward()
    log_probs = torch.log_softmax(logits.detach().requires_grad_(), -1)
    want = torch.autograd.grad((log_probs.gather(1, blocks) * upstream).sum(), log_probs)[0]
    want = torch.autograd.functional.vjp(lambda z: torch.log_softmax(z, -1), logits.detach(), want)[1]
    torch.testing.assert_close(logits.grad, want)


def test_gate_stays_finite_when_chosen_probabilities_underflow():
    """A calibrated router's logits are output norms, which can differ by hundreds: softmax underflows to 0."""
    logits = torch.tensor([[500.0, 0.0, -300.0, 1.0]], requires_grad=True)
    blocks, gate = route_tokens(logits, 3)
    assert torch.equal(gate.detach(), torch.ones(1, 3))
    (gate * torch.randn(1, 3)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_blocks_without_tokens_get_zero_weight_gradient():
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64, requires_grad=True)
    weights = make_weights()
    blocks = torch.zeros(TOKENS, 1, dtype=torch.int64)  # every token uses block 0 of 4
    gate = torch.ones(TOKENS, 1, dtype=torch.float64)
    routed_ffn(x, *weights, blocks, gate, 4, backend="reference").sum().backward()
    assert (weights[0].grad[INNER // 4 :] == 0).all() and (weights[2].grad[:, INNER // 4 :] == 0).all()
    assert (weights[0].grad[: INNER // 4] != 0).any()


def test_gradcheck_float64():
    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    w_gate, w_up = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    w_down = torch.randn(8, 12, dtype=torch.float64)
    blocks = torch.stack([torch.randperm(3)[:2] for _ in range(7)])
    gate = torch.rand(7, 2, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (w_gate, w_up, w_down, gate)]
    assert torch.autograd.gradcheck(
        lambda x, wg, wu, wd, g: routed_ffn(x, wg, wu, wd, blocks, g, 3, backend="reference"), [x, *inputs]
    )


def test_routed_mlp_with_all_blocks_matches_llama_mlp():
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_attention_heads=2))
    x = torch.randn(2, 5, HIDDEN)
    want = mlp(x)
    routed = RoutedMLP(mlp, n_blocks=4, active_blocks=4, router_init_std=0.02, backend="reference")
    torch.testing.assert_close(routed(x), want)
    assert routed.restore() is mlp


def test_the_router_surrogate_gradient_trains_the_router_but_stays_out_of_the_residual_stream():
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_attention_heads=2)).double()
    routed = RoutedMLP(mlp, n_blocks=4, active_blocks=2, router_init_std=1.0, backend="reference")
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    (routed(x) * grad_out).sum().backward()
    blocks, _ = route_tokens(routed.router(x).detach(), 2)
    masked = x.detach().clone().requires_grad_()
    weights = [w.detach() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    (dense_swiglu(masked, *weights, unit_weights(blocks, torch.ones(TOKENS, 2, dtype=torch.float64), 4))
     * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, masked.grad)  # exactly the routed function's own input gradient
    assert routed.router.weight.grad.abs().sum() > 0


def test_errors_name_the_bad_input():
    x = torch.randn(4, HIDDEN)
    w_gate, w_up, w_down = (w.detach().float() for w in make_weights())
    blocks, gate = route_tokens(torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="divisible"):
        routed_ffn(x, w_gate, w_up, w_down, blocks, gate, 5)
    with pytest.raises(ValueError, match="w_down"):
        routed_ffn(x, w_gate, w_up, w_down.T, blocks, gate, 4)
    with pytest.raises(TypeError, match="w_up"):
        routed_ffn(x, w_gate, w_up.double(), w_down, blocks, gate, 4)
    with pytest.raises(ValueError, match="SwiGLU"):
        gelu = LlamaConfig(hidden_size=16, intermediate_size=48, num_attention_heads=2, hidden_act="gelu")
        RoutedMLP(LlamaMLP(gelu), 4, 2, 0.02, "auto")

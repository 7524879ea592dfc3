"""calibrate: routers become the ridge fit of per-block FFN output norms; codebooks the k-means of real q/k."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from spt_kernels import SPTConfig, calibrate, patch_model
from spt_kernels.patching import SPTAttentionState
from spt_kernels.routed_mlp import RoutedMLP
from tiny_models import TINY, batch, logits, tiny_model


def block_norm_targets(model, batches):
    """Per RoutedMLP: its inputs (T, hidden) and each block's output norm (T, n), from an independent dense loop."""
    captured = {}

    def hook(module, args, output):
        x = args[0].reshape(-1, args[0].shape[-1])
        h = torch.nn.functional.silu(module.gate_proj(x)) * module.up_proj(x)
        width = h.shape[1] // module.n_blocks
        w = module.down_proj.weight
        norms = [(h[:, b * width : (b + 1) * width] @ w[:, b * width : (b + 1) * width].T).norm(dim=-1)
                 for b in range(module.n_blocks)]
        captured.setdefault(module, []).append((x, torch.stack(norms, -1)))

    mlps = [m for m in model.modules() if isinstance(m, RoutedMLP)]
    handles = [m.register_forward_hook(hook) for m in mlps]
    for ids in batches:
        with torch.no_grad():
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return {m: (torch.cat([c[0] for c in v]), torch.cat([c[1] for c in v])) for m, v in captured.items()}


def test_router_is_the_least_squares_fit_of_block_output_norms():
    model = patch_model(tiny_model("llama"), SPTConfig(sparsity=1, ffn_blocks=4, ffn_active_blocks=2))
    batches = [torch.randint(0, TINY["vocab_size"], (2, 16)) for _ in range(3)]
    summary = calibrate(model, batches, ridge=0.0, progress=False)
    assert summary == {"batches": 3, "tokens": 96, "router_fit_layers": 2, "codebook_layers": 2}
    # The calibration ran the FFN dense, so a dense model (all blocks) sees the same inputs.
    model.model.layers[0].mlp.active_blocks = 4
    model.model.layers[1].mlp.active_blocks = 4
    for mlp, (x, norms) in block_norm_targets(model, batches).items():
        features = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        want = torch.linalg.lstsq(features, norms.double()).solution.T.float()
        torch.testing.assert_close(mlp.router.weight, want[:, :-1], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(mlp.router.bias, want[:, -1], atol=1e-4, rtol=1e-3)


class BlockStructuredFFN(torch.nn.Module):
    """A RoutedMLP whose block b fires for inputs along direction u_b: the blocks that matter depend on the token."""

    def __init__(self, n_blocks=4, hidden=32, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.directions = torch.nn.functional.normalize(torch.randn(n_blocks, hidden), dim=1)
        mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=n_blocks * width))
        with torch.no_grad():
            for b in range(n_blocks):
                mlp.gate_proj.weight[b * width : (b + 1) * width] = 0.1 * torch.randn(width, hidden) + 2 * self.directions[b]
        self.mlp = RoutedMLP(mlp, n_blocks, active_blocks=1, router_init_std=0.02, backend="reference")

    def tokens(self, n):
        return 0.3 * torch.randn(n, self.directions.shape[1]) + 2 * self.directions[torch.randint(0, len(self.directions), (n,))]

    def forward(self, x):
        return self.mlp(x)


def test_calibrated_router_picks_the_blocks_that_matter():
    model = BlockStructuredFFN()
    x = model.tokens(256)
    with torch.no_grad():
        dense = model.mlp.dense_with_block_norms(x)[0]
        random_error = ((model(x) - dense) ** 2).sum()
        calibrate(model, [{"x": model.tokens(128)} for _ in range(4)], progress=False)
        calibrated_error = ((model(x) - dense) ** 2).sum()
    assert calibrated_error < 0.2 * random_error, (calibrated_error, random_error)


def test_codebooks_are_refit_on_all_batches_and_the_model_is_left_as_it_was():
    model = patch_model(tiny_model("qwen2"), SPTConfig(sparsity=4))
    model.train()
    states = [m for m in model.modules() if isinstance(m, SPTAttentionState)]
    model(input_ids=torch.randint(0, TINY["vocab_size"], (1, 8)))  # first codebooks: from this batch alone
    first = [s.pq.codebook.clone() for s in states]
    calibrate(model, [{"input_ids": torch.randint(0, TINY["vocab_size"], (2, 24))} for _ in range(2)], progress=False)
    assert model.training
    assert all(not torch.equal(s.pq.codebook, f) for s, f in zip(states, first))
    assert all(m.calibration is None for m in model.modules() if isinstance(m, (SPTAttentionState, RoutedMLP)))


def test_calibrate_refuses_an_unpatched_model_and_no_batches():
    with pytest.raises(ValueError, match="patch_model"):
        calibrate(tiny_model("llama"), [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="no batches"):
        calibrate(patch_model(tiny_model("llama")), [], progress=False)

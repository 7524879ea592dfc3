"""calibrate: routers become the ridge fit of per-block FFN output norms; codebooks the k-means of real q/k."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from spt_kernels import SPTConfig, calibrate, patch_model, router_recall
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
    summary = calibrate(model, batches, ridge=0.0, regroup=False, progress=False)
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
    """A RoutedMLP whose units form groups that fire for inputs along direction u_g: which units matter depends on
    the token. `interleaved` spreads every group over all blocks (unit i in group i % n) instead of one block each."""

    def __init__(self, n_blocks=4, hidden=32, width=16, interleaved=False):
        super().__init__()
        torch.manual_seed(0)
        self.directions = torch.nn.functional.normalize(torch.randn(n_blocks, hidden), dim=1)
        mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=n_blocks * width))
        units = torch.arange(n_blocks * width)
        group = units % n_blocks if interleaved else units // width
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(0.1 * torch.randn(n_blocks * width, hidden) + 2 * self.directions[group])
        self.mlp = RoutedMLP(mlp, n_blocks, active_blocks=1, router_init_std=0.02, backend="reference")

    def tokens(self, n):
        return 0.3 * torch.randn(n, self.directions.shape[1]) + 2 * self.directions[torch.randint(0, len(self.directions), (n,))]

    def forward(self, x):
        return self.mlp(x)


def routing_error(model, x, dense):
    with torch.no_grad():
        return ((model(x) - dense) ** 2).sum() / (dense**2).sum()


@pytest.mark.parametrize("regroup", [False, True])
def test_calibrated_router_picks_the_blocks_that_matter(regroup):
    model = BlockStructuredFFN()
    x = model.tokens(256)
    dense = model.mlp.dense_with_block_norms(x)[0].detach()
    random_error = routing_error(model, x, dense)
    calibrate(model, [{"x": model.tokens(128)} for _ in range(4)], regroup=regroup, progress=False)
    assert routing_error(model, x, dense) < 0.2 * random_error


def test_regrouping_gathers_units_that_fire_together_into_one_block():
    model = BlockStructuredFFN(interleaved=True)  # every block holds a quarter of every group: no block choice works
    x = model.tokens(256)
    dense = model.mlp.dense_with_block_norms(x)[0].detach()
    calibrate(model, [{"x": model.tokens(128)} for _ in range(4)], regroup=False, progress=False)
    kept_blocks = routing_error(model, x, dense)
    calibrate(model, [{"x": model.tokens(128)} for _ in range(4)], progress=False)
    order = model.mlp.unit_order
    assert sorted(order.tolist()) == list(range(64))
    groups = (order % 4).view(4, 16)  # the group of each unit, block by block
    assert all(len(set(g.tolist())) == 1 for g in groups), groups
    assert routing_error(model, x, dense) < 0.2 * kept_blocks
    with torch.no_grad():  # all blocks active: the regrouped FFN is still exactly the dense FFN
        model.mlp.active_blocks = 4
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=1e-5)


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


def test_calibrated_model_with_every_key_and_block_is_still_the_dense_model():
    dense = tiny_model("qwen2")
    ids, mask = batch()
    want = logits(dense, ids, mask)
    model = patch_model(tiny_model("qwen2"), SPTConfig(sparsity=1, ffn_blocks=4, ffn_active_blocks=4))
    calibrate(model, [torch.randint(0, TINY["vocab_size"], (2, 16)) for _ in range(2)], progress=False)
    assert any(not torch.equal(m.unit_order, torch.arange(128)) for m in model.modules() if isinstance(m, RoutedMLP))
    assert any(k.endswith("mlp.unit_order") for k in model.state_dict())  # checkpoints keep the grouping
    real = mask.bool()
    torch.testing.assert_close(logits(model, ids, mask)[real], want[real], atol=1e-5, rtol=1e-5)


def test_router_recall_is_one_for_a_perfect_router_and_falls_when_the_weights_move():
    model = patch_model(tiny_model("llama"), SPTConfig(sparsity=1, ffn_blocks=4, ffn_active_blocks=2))
    batches = [torch.randint(0, TINY["vocab_size"], (2, 16)) for _ in range(3)]
    mlps = [m for m in model.modules() if isinstance(m, RoutedMLP)]

    class Oracle(torch.nn.Module):  # a router whose logits are the true block norms of the inputs it sees
        def __init__(self, mlp):
            super().__init__()
            self.__dict__["mlp"] = mlp  # not a submodule (no cycle in the module tree)

        def forward(self, x):
            return self.mlp.dense_with_block_norms(x)[1]

    routers = [m.router for m in mlps]
    for mlp in mlps:
        mlp.router = Oracle(mlp)
    assert router_recall(model, batches) == [1.0] * len(mlps)
    for mlp, router in zip(mlps, routers):
        mlp.router = router
    calibrate(model, batches, regroup=False, progress=False)
    fitted = router_recall(model, batches)
    with torch.no_grad():
        for mlp in mlps:
            mlp.down_proj.weight.mul_(torch.rand(mlp.down_proj.weight.shape[1]) * 4)  # blocks' importance reshuffled
    moved = router_recall(model, batches)
    assert all(0.5 <= r <= 1.0 for r in fitted) and sum(moved) < sum(fitted)
    with pytest.raises(ValueError, match="patch_model"):
        router_recall(tiny_model("llama"), batches)


def test_skipped_blocks_add_back_the_least_squares_fit_of_the_routing_error():
    model = BlockStructuredFFN()
    mlp = model.mlp
    calibration = [model.tokens(128) for _ in range(3)]
    calibrate(model, [{"x": x} for x in calibration], ridge=0.0, regroup=False, progress=False)

    def parts_and_skipped(x):  # independent of RoutedMLP.block_outputs: slices of the dense FFN, block by block
        h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        w = mlp.down_proj.weight
        parts = torch.stack([h[:, b * 16 : (b + 1) * 16] @ w[:, b * 16 : (b + 1) * 16].T for b in range(4)], 1)
        picked = mlp.router(x).topk(mlp.active_blocks, dim=-1).indices
        skipped = torch.ones(len(x), 4).scatter_(1, picked, 0.0)
        return parts, skipped

    with torch.no_grad():
        parts, skipped = parts_and_skipped(torch.cat(calibration))
        error = (skipped[:, :, None] * parts).sum(1)  # what routing leaves out
        want = torch.linalg.lstsq(skipped.double(), error.double()).solution.float()
        torch.testing.assert_close(mlp.skip_compensation, want, atol=1e-4, rtol=1e-3)
        assert (want.norm(dim=1) > 0.1 * error.norm(dim=1).mean()).all()  # not vacuous: a real correction

        x = model.tokens(256)  # fresh tokens: the forward adds the compensation of exactly the skipped blocks
        parts, skipped = parts_and_skipped(x)
        routed = ((1 - skipped)[:, :, None] * parts).sum(1)
        torch.testing.assert_close(model(x), routed + skipped @ want, atol=1e-4, rtol=1e-3)
        compensated = routing_error(model, x, parts.sum(1))
        calibrate(model, [{"x": x} for x in calibration], regroup=False, compensate=False, progress=False)
        assert torch.equal(mlp.skip_compensation, torch.zeros_like(mlp.skip_compensation))
        torch.testing.assert_close(model(x), routed, atol=1e-5, rtol=1e-4)
        assert compensated < routing_error(model, x, parts.sum(1))

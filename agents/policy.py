"""The policy both stages train: a causal LM with the embed token, its adapters, SPT if asked; one loader for all.

SFT builds it from a base model (:func:`build_embedder`, :func:`make_trainable`);
GRPO from an SFT checkpoint, merged, with fresh adapters on top
(:func:`policy_from_sft`). :func:`load_agent` turns any checkpoint, SFT or
GRPO, back into a (query agent, document encoder) pair by reading the layout
the checkpoint recorded (:mod:`agents.layout`), never a module constant.
The optimiser and learning-rate schedule are here too, so neither stage
imports the other.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

import torch

from searchr3_env.cache_keys import folder_digest

from .checkpoint import (
    checkpoint_id,
    load_weights,
    read_config,
    read_json,
    resolve_checkpoint,
    STATE,
    weights_digest,
)
from .config import SMOLLM2, GRPOConfig, SFTConfig
from .embedder import LLMEmbedder
from .layout import Layout, read_layout
from .models import load_causal_lm, resolve_model_dir


def model_tag(spec: str) -> str:
    return SMOLLM2 if spec == SMOLLM2 else re.sub(r"[^A-Za-z0-9_.]+", "_", Path(spec).name)


def base_encoder_name(model: str, max_doc_tokens: int, lowercase: bool) -> str:
    """Name of the untrained model's embeddings (shared by runs, so its corpus index is cached once)."""
    return f"llm-{model_tag(model)}-d{max_doc_tokens}{'-lc' if lowercase else ''}"


def build_embedder(cfg: SFTConfig) -> LLMEmbedder:
    """The base model with the embed token, as an embedder named for the *untrained* weights (its files' digest)."""
    return embedder_of(Layout.of_sft(cfg), cfg.device, cfg.dtype, cfg.cache_dir)


def embedder_of(layout: Layout, device: str, dtype: str, cache_dir: str | Path) -> LLMEmbedder:
    """The untrained base model of ``layout`` as an embedder."""
    path = resolve_model_dir(layout.model, Path(cache_dir))
    model, tokenizer = load_causal_lm(path, dtype=dtype, device=device)
    return LLMEmbedder(model, tokenizer, name=base_encoder_name(layout.model, layout.max_doc_tokens, layout.lowercase),
                       max_doc_tokens=layout.max_doc_tokens, max_query_tokens=layout.max_query_tokens,
                       lowercase=layout.lowercase, weights_id=folder_digest(path))


def make_trainable(embedder: LLMEmbedder, layout: Layout, *, gradient_checkpointing: bool = False,
                   calibration_texts: Sequence[str] = (), progress: bool = False):
    """Wrap the model in ``layout``'s LoRA adapters (or unfreeze it), SPT-patch it if asked; returns the frozen KL
    reference (None: the same model with its adapters disabled).

    SPT is patched after LoRA so its routers and codebooks train too; the KL
    reference is then the dense base model (a copy taken before patching), so
    the KL term also pulls the sparse model towards the dense one. A freshly
    patched model has random routers: `calibration_texts` (document prompts) fit
    them and the PQ codebooks to the pretrained model first (`spt_kernels.calibrate`).
    """
    model = embedder.model
    reference = copy.deepcopy(model).requires_grad_(False) if not layout.lora or layout.spt else None
    if not layout.lora:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        n_layers = model.config.num_hidden_layers
        layers = list(range(n_layers - layout.lora_layers, n_layers)) if layout.lora_layers else None
        lora = LoraConfig(r=layout.lora_rank, lora_alpha=layout.lora_alpha, lora_dropout=0.0,
                          target_modules=list(layout.lora_targets), layers_to_transform=layers,
                          trainable_token_indices=[embedder.embed_id] if layout.train_embed_token else None)
        embedder.model = get_peft_model(model, lora)
    if layout.spt:
        from spt_kernels import SPTConfig, calibrate, patch_model
        from spt_kernels.patching import is_patched

        if not is_patched(embedder.model):  # a loaded SPT checkpoint (GRPO after SPT SFT) has trained routers already
            patch_model(embedder.model, SPTConfig(**layout.spt))
            if calibration_texts:
                sequences, size = embedder.document_sequences(calibration_texts), embedder.batch_size
                padded = (embedder.pad(sequences[i : i + size]) for i in range(0, len(sequences), size))
                batches = ({"input_ids": ids, "attention_mask": mask} for ids, mask, _ in padded)
                calibrate(embedder.model, batches, progress=progress)
    train_mode(embedder, gradient_checkpointing)
    return reference


def train_mode(embedder: LLMEmbedder, gradient_checkpointing: bool) -> None:
    """Training mode: SPT moves its codebooks and Hugging Face checkpoints layers only while ``model.training``.

    The supported models have no dropout, so nothing else changes; evaluation
    (``inference_mode``) and generation (no gradient) skip both.
    """
    if gradient_checkpointing:
        embedder.model.activation_checkpointing_enable()  # non-reentrant: works with frozen inputs (LoRA)
    embedder.model.train()


def build_optimizer(model, lr: float, weight_decay: float, embed_token_lr_scale: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the embed token's row (LoRA's trainable token) at ``lr * scale``.

    Adam moves a parameter at most about ``lr`` per step whatever its gradient,
    and the new token's row starts at the mean row, far below being predicted
    after "The embedding is": at the adapters' rate a short run never learns to
    end a reasoning by itself, and GRPO's format reward would have nothing to
    separate. One row at a higher rate is the usual treatment of a new token
    (textual inversion trains embeddings at ~10x a LoRA's rate).
    """
    token_rows, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (token_rows if "trainable_tokens_delta" in name else rest).append(param)
    groups = [{"params": rest}] + ([{"params": token_rows, "lr": lr * embed_token_lr_scale}] if token_rows else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def cosine_schedule(warmup_steps: int, max_steps: int):
    """Learning-rate factor per step: linear warm-up, then cosine decay to 0 at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# ---------------------------------------------------------------------------------------------- GRPO's policy
def policy_from_sft(cfg: GRPOConfig, batch_size: int | None = None, layout: Layout | None = None):
    """(policy, document encoder, reference or None, the SFT config, the GRPO layout) from SFT checkpoint ``cfg.init``.

    The SFT weights are merged (if LoRA) and fresh adapters go on top, so the
    reference is the policy with adapters off. The document encoder is the
    policy itself when SFT trained documents, else the untrained base model.
    ``layout``: the adapters a GRPO checkpoint recorded, to load it; None: a new run's.
    """
    checkpoint = resolve_checkpoint(cfg.init)
    sft_cfg = read_config(checkpoint, SFTConfig)
    policy, documents = load_agent(checkpoint, device=cfg.device or None, dtype=cfg.dtype or None,
                                   cache_dir=cfg.cache_dir or None, batch_size=batch_size or max(16, cfg.group_size))
    sft_layout = read_layout(checkpoint)
    if sft_layout.lora:
        policy.model = policy.model.merge_and_unload()
    layout = layout or Layout.of_grpo(cfg, sft_layout, checkpoint)
    reference = make_trainable(policy, layout, gradient_checkpointing=cfg.gradient_checkpointing,
                               progress=sft_cfg.progress)
    return policy, documents, reference, sft_cfg, layout


# ---------------------------------------------------------------------------------------------- one loader
def load_agent(path: str | Path, *, reasoning_tokens: int | None = None, device: str | None = None,
               dtype: str | None = None, batch_size: int = 16,
               cache_dir: str | Path | None = None) -> tuple[LLMEmbedder, LLMEmbedder]:
    """(query embedder, document encoder) of any checkpoint, SFT or GRPO, or a run folder's latest checkpoint.

    The agent reasons greedily with ``reasoning_tokens`` (None: the budget it was trained with).

    The trained embedder's name carries a digest of its weights and its version
    the step; its cache key covers the base model's files and the checkpoint's
    weights and config. A run with frozen documents pairs it with the untrained
    base model as document encoder, whose corpus index is shared with the base
    model's evaluation.
    """
    checkpoint = resolve_checkpoint(path)
    layout = read_layout(checkpoint)
    if layout.stage == "grpo":
        cfg = read_config(checkpoint, GRPOConfig)
        cfg = dataclasses.replace(cfg, init=layout.base, device=device or cfg.device, dtype=dtype or cfg.dtype,
                                  cache_dir=str(cache_dir or cfg.cache_dir))
        policy, documents, _, _, _ = policy_from_sft(cfg, batch_size, layout)
        suffix = "-grpo"
    else:
        cfg = read_config(checkpoint, SFTConfig)
        policy = embedder_of(layout, device or cfg.device, dtype or cfg.dtype, cache_dir or cfg.cache_dir)
        if layout.lora or layout.spt:  # the same adapter and SPT layout as in training, so the saved names match
            make_trainable(policy, layout)
        documents, suffix = policy if cfg.train_documents else None, ""
    before = policy.weights_id
    load_weights(checkpoint, policy.model)
    policy.model.requires_grad_(False).eval()
    policy.name = f"{policy.name}{suffix}-{weights_digest(checkpoint)}"
    policy.version = read_json(checkpoint, STATE)["version"]
    policy.weights_id = checkpoint_id(checkpoint, before)
    policy.reasoning_tokens = cfg.reasoning_tokens if reasoning_tokens is None else reasoning_tokens
    policy.batch_size = batch_size
    if documents is None:
        documents = embedder_of(layout, device or cfg.device, dtype or cfg.dtype, cache_dir or cfg.cache_dir)
        documents.batch_size = batch_size
    return policy, documents

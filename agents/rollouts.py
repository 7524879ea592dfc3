"""GRPO rollouts of the LLM embedder: sampled reasoning, the format reward, group advantages.

A rollout of query q is one sampled response: up to ``budget`` reasoning
tokens, ended either by the model itself emitting ``<|embed_token|>`` (then the
embedding is read right there) or, if it stopped on end-of-turn or ran out of
budget, by the fixed answer "The embedding is <|embed_token|>" appended after
it (see :meth:`PromptTemplate.sequence`). Only the *sampled* tokens are the
policy's actions; the appended answer is not, so the policy-gradient and KL
terms cover exactly :attr:`Rollouts.token_rows` / :attr:`Rollouts.token_cols`.

Shared by :mod:`agents.grpo` and the TRL reward (:mod:`agents.trl_reward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .embedder import LLMEmbedder


@dataclass
class Rollouts:
    """``len(query_ids)`` rollouts, consecutive groups of the same query."""

    query_ids: list[str]
    reasoning: list[list[int]]  # sampled token ids per rollout (ends with the embed token if the model emitted it)
    sequences: list[list[int]]  # full token sequences, ending at the embed token
    starts: list[int]  # position of the first response token in each sequence
    format_reward: np.ndarray  # (n,) in [0, 1], see format_reward()
    emitted: np.ndarray  # (n,) bool: the model itself emitted the embed token

    def token_positions(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, targets) of the sampled tokens: hidden[rows, cols] predicts targets (= ids at cols + 1)."""
        rows, cols, targets = [], [], []
        for i, (start, tokens) in enumerate(zip(self.starts, self.reasoning)):
            rows += [i] * len(tokens)
            cols += range(start - 1, start - 1 + len(tokens))
            targets += tokens
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return as_long(rows), as_long(cols), as_long(targets)

    @property
    def reasoning_lengths(self) -> np.ndarray:
        """Reasoning tokens per rollout, not counting an emitted embed token."""
        return np.array([len(r) for r in self.reasoning]) - self.emitted


def format_reward(reasoning: Sequence[Sequence[int]], embed_id: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(reward in [0, 1], emitted) per response: half for emitting the embed token, half for stopping within budget.

    A response that used its whole budget without stopping was cut off by the
    generator (its reasoning may be unfinished), so it earns neither half.
    """
    emitted = np.array([len(r) > 0 and r[-1] == embed_id for r in reasoning], dtype=bool)
    stopped = np.array([len(r) < budget for r in reasoning], dtype=bool) | emitted
    return 0.5 * emitted + 0.5 * stopped, emitted


def sample_rollouts(embedder: LLMEmbedder, query_ids: Sequence[str], texts: Sequence[str], group: int,
                    budget: int, temperature: float) -> Rollouts:
    """``group`` sampled responses for each query (rollout i * group + g is query i's g-th)."""
    ids = [q for q in query_ids for _ in range(group)]
    repeated = [t for t in texts for _ in range(group)]
    reasoning = (embedder.generate_reasoning(repeated, max_new_tokens=budget, temperature=temperature) if budget > 0
                 else [[] for _ in ids])
    fmt, emitted = format_reward(reasoning, embedder.embed_id, budget)
    return Rollouts(ids, reasoning, embedder.query_sequences(repeated, reasoning),
                    embedder.query_response_starts(repeated), fmt, emitted)


def group_advantages(rewards: np.ndarray, group: int, eps: float = 1e-4) -> np.ndarray:
    """(r - mean of its group) / (std of its group + eps): a group whose rollouts all tie gets 0."""
    grouped = np.asarray(rewards, dtype=np.float64).reshape(-1, group)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    return (centred / (grouped.std(axis=1, keepdims=True) + eps)).ravel()

"""``SearchR3-v0`` as a reward function for TRL's ``GRPOTrainer`` (optional extra ``trl``).

TRL samples the completions (the reasoning), computes group advantages and the
policy loss; this module only answers "how good is each completion as a search
query?". For each completion it builds the embedder's query sequence
(prompt, reasoning, then ``<|embed_token|>``: the model's own if it emitted
one, else the fixed answer appended), embeds it with the *current* policy
weights (the embedder wraps the very model TRL trains), and scores all of them
in one batched step of the vector env:

    reward = env reward (full-depth nDCG by default) + w_format * format reward

with the format reward of :func:`agents.rollouts.format_reward`. The dataset
must carry a ``query_id`` column (TRL passes dataset columns to reward
functions); :func:`trl_dataset` builds one in TRL's conversational format with
the embedder's query system prompt.

When the env's document encoder is the same embedder, the reward sets its
``version`` to ``start version + optimiser steps`` from TRL's ``trainer_state``,
so the env's refresh policy re-encodes stale documents after every step, as in
:mod:`agents.grpo`. (TRL's loss has no contrastive term; use :mod:`agents.grpo`
to train the embedding directly.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from searchr3_env.extras import import_extra

torch = import_extra("torch", "llm", "agents.trl_reward")  # before the agents modules below, which need it too

from searchr3_env.task import RetrievalTask
from searchr3_env.vector_env import RetrievalVectorEnv

from .embedder import LLMEmbedder, as_list, cut_at_stop
from .prompts import QUERY_SYSTEM
from .rollouts import format_reward


class SearchR3Reward:
    """``reward_funcs`` entry for ``trl.GRPOTrainer``: embed each completion, score it in the env.

    Args:
        embedder: the LLMEmbedder around the model being trained.
        task: the env's task (collection, document index, reward, refresh policy).
        w_format: weight of the format reward.
        budget: TRL's ``max_completion_length``: a completion that used all of it earns no "stopped" half.
    """

    def __init__(self, embedder: LLMEmbedder, task: RetrievalTask, *, budget: int, w_format: float = 0.1):
        self.embedder, self.task, self.budget, self.w_format = embedder, task, budget, w_format
        self.start_version = embedder.version
        self.__name__ = f"searchr3_{task.reward_name}"  # TRL logs each reward function under its __name__
        eos = as_list(embedder.model.generation_config.eos_token_id) + [embedder.tokenizer.eos_token_id]
        self.stops = {embedder.embed_id, *eos} - {None}

    def __call__(self, prompts, completions, completion_ids: Sequence[Sequence[int]], query_id: Sequence[str],
                 trainer_state=None, **unused) -> list[float]:
        if trainer_state is not None and self.task.encoder is self.embedder:
            self.embedder.version = self.start_version + trainer_state.global_step
        reasoning = [cut_at_stop(list(ids), self.stops, self.embedder.embed_id) for ids in completion_ids]
        texts = [self.task.query_text(q) for q in query_id]
        with torch.inference_mode():
            embeddings = self.embedder.forward(self.embedder.query_sequences(texts, reasoning)).embeddings
        env = RetrievalVectorEnv(num_envs=len(texts), task=self.task)
        env.reset(options={"query_ids": list(query_id)})
        _, env_reward, _, _, _ = env.step(embeddings.float().cpu().numpy())
        fmt, _ = format_reward(reasoning, self.embedder.embed_id, self.budget)
        return (np.asarray(env_reward) + self.w_format * fmt).tolist()


def trl_dataset(task: RetrievalTask, query_ids: Sequence[str] | None = None):
    """A ``datasets.Dataset`` of conversational prompts (system + query) with their ``query_id``."""
    from datasets import Dataset

    ids = list(query_ids if query_ids is not None else task.query_ids)
    prompts = [[{"role": "system", "content": QUERY_SYSTEM}, {"role": "user", "content": task.query_text(q)}]
               for q in ids]
    return Dataset.from_dict({"prompt": prompts, "query_id": ids})

"""Rewards: named functions of the relevant documents' ranks.

A reward function takes ``ranks`` and ``grades``, both ``(n, m)`` arrays (one
row per query, its relevant documents; padding has rank ``inf`` and grade 0),
and returns ``(n,)`` float rewards. Ranks come from :meth:`CorpusIndex.ranks` (pessimistic: ties
count against the agent). Built-in names:

* ``ndcg`` (default): full-depth nDCG with graded gains, in [0, 1]. Dense:
  every relevant document moving up any amount raises it, which RL needs.
* ``reciprocal_rank``: 1 / best rank, in (0, 1].
* ``neg_log_rank``: -ln(best rank), in (-ln N, 0]; less flat than 1/rank deep down.
* ``recall@k``: share of relevant documents in the top k, e.g. ``recall@100``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from .metrics import ndcg, parse_metric, recall, reciprocal_rank

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def ndcg_reward(ranks: np.ndarray, grades: np.ndarray) -> np.ndarray:
    return ndcg(ranks, grades)


def reciprocal_rank_reward(ranks: np.ndarray, grades: np.ndarray) -> np.ndarray:
    return reciprocal_rank(ranks)


def neg_log_rank(ranks: np.ndarray, grades: np.ndarray) -> np.ndarray:
    return -np.log(np.asarray(ranks, dtype=np.float64).min(axis=1))


def recall_reward(ranks: np.ndarray, grades: np.ndarray, k: int) -> np.ndarray:
    return recall(ranks, (np.asarray(grades) > 0).sum(axis=1), k)


# Module-level functions, not lambdas, so that envs pickle (Ray, multiprocessing).
REWARDS: dict[str, RewardFn] = {
    "ndcg": ndcg_reward,
    "reciprocal_rank": reciprocal_rank_reward,
    "neg_log_rank": neg_log_rank,
}


def get_reward(spec: str | RewardFn) -> tuple[str, RewardFn]:
    """(name, function) for a reward name, ``recall@k``, or a callable of (ranks, grades)."""
    if callable(spec):
        return getattr(spec, "__name__", "custom"), spec
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if isinstance(spec, str) and spec.startswith("recall@"):
        _, k = parse_metric(spec)
        return spec, partial(recall_reward, k=k)
    raise ValueError(f"unknown reward {spec!r}; choose one of {sorted(REWARDS)}, 'recall@K', or a callable")

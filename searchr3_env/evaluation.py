"""Evaluate a query agent through the vector env: every judged query of a split, scored once.

An *agent* is anything with ``encode_queries(texts) -> (n, dim)`` (every encoder
is one). The queries go through ``RetrievalVectorEnv`` exactly as in training,
so evaluation exercises the same action checks and index; the env's top-k
(``depth``) results form a run that :func:`evaluate_run` scores with trec_eval's
conventions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from .index import CorpusIndex, load_or_build_index
from .metrics import RunEvaluation, evaluate_run
from .task import RetrievalTask
from .vector_env import RetrievalVectorEnv

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map")


class QueryAgent(Protocol):
    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class AgentEvaluation:
    metrics: RunEvaluation
    run: dict[str, dict[str, float]]
    mean_reward: float


def evaluate_agent(
    agent: QueryAgent,
    task: RetrievalTask,
    *,
    batch_size: int = 64,
    metrics: Sequence[str] = DEFAULT_METRICS,
    progress: bool = True,
    desc: str = "queries",
) -> AgentEvaluation:
    """Score every judged query of ``task``'s split once; the run holds the env's top ``task.top_k``."""
    run: dict[str, dict[str, float]] = {}
    rewards = []
    ids = task.query_ids
    with tqdm(total=len(ids), desc=desc, unit="query", disable=not progress, leave=False) as bar:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            env = RetrievalVectorEnv(num_envs=len(chunk), task=task)
            obs, _ = env.reset(options={"query_ids": chunk})
            _, reward, _, _, info = env.step(agent.encode_queries(list(obs)))
            final = info["final_info"]
            for qid, doc_ids, scores in zip(final["query_id"], final["top_k_ids"], final["top_k_scores"]):
                run[qid] = dict(zip(doc_ids, scores))
            rewards.append(reward)
            bar.update(len(chunk))
    return AgentEvaluation(evaluate_run(run, task.dataset.qrels, metrics), run, float(np.concatenate(rewards).mean()))


def evaluate_pair(
    name: str,
    agent: QueryAgent,
    encoder,
    dataset,
    *,
    split: str = "test",
    depth: int = 1000,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict, AgentEvaluation]:
    """(table row, evaluation) for a (query agent, document encoder) pair on a collection.

    The corpus index is loaded from ``cache_dir`` when given (built and saved
    there otherwise) or built afresh. The row holds the collection, split,
    number of scored queries, agent name, index build seconds (``index_s``)
    and the mean metrics; the evaluation also has the run and per-query scores.
    """
    start = time.perf_counter()
    if cache_dir is not None:
        index = load_or_build_index(dataset, encoder, cache_dir, progress=progress)
    else:
        index = CorpusIndex.build(dataset, encoder, progress=progress)
    index_s = time.perf_counter() - start
    task = RetrievalTask(dataset, encoder, index, split=split, top_k=depth)
    evaluation = evaluate_agent(agent, task, progress=progress, desc=f"{name} on {dataset.name}")
    row = {
        "collection": dataset.name,
        "split": task.dataset.split_name,
        "queries": len(evaluation.metrics.per_query),
        "agent": name,
        "index_s": index_s,
        **evaluation.metrics.mean,
    }
    return row, evaluation

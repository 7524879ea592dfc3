"""Evaluate a query agent through the vector env: every judged query of a split, scored once.

An *agent* is anything with ``encode_queries(texts) -> (n, dim)`` (every encoder
is one). Its embeddings are stepped through ``RetrievalVectorEnv`` exactly as
in training, so evaluation exercises the same action checks and index; the
env's top-k (``depth``) results form a run that :func:`evaluate_run` scores
with trec_eval's conventions. A query the agent embeds as an all-zero vector
(empty, only stopwords, or no token it knows) has no direction to rank by: it
retrieves nothing and scores 0, as trec_eval scores a judged query missing from
a run, and a warning names it. NaN or inf embeddings are errors naming the query.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map")


class QueryAgent(Protocol):
    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class AgentEvaluation:
    metrics: RunEvaluation
    run: dict[str, dict[str, float]]
    mean_reward: float
    unranked: tuple[str, ...] = ()  # queries embedded as zero vectors: nothing retrieved, scored 0


def evaluate_agent(
    agent: QueryAgent,
    task: RetrievalTask,
    *,
    batch_size: int = 64,
    metrics: Sequence[str] = DEFAULT_METRICS,
    progress: bool = True,
    desc: str = "queries",
) -> AgentEvaluation:
    """Score every judged query of ``task``'s split once; the run holds the env's top ``task.top_k``.

    Queries embedded as zero vectors retrieve nothing: they are absent from the
    run (every metric 0), get the reward of ranking no relevant document
    (``reward(ranks=inf)``, 0 for the built-in rewards but ``neg_log_rank``),
    and are listed in ``unranked`` and in a warning.
    """
    run: dict[str, dict[str, float]] = {}
    rewards = []
    unranked: list[str] = []
    ids = task.query_ids
    with tqdm(total=len(ids), desc=desc, unit="query", disable=not progress, leave=False) as bar:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            embeddings = np.asarray(agent.encode_queries([task.query_text(q) for q in chunk]))
            zero = _zero_rows(embeddings, len(chunk))
            blank = [q for q, z in zip(chunk, zero) if z]
            ranked = [q for q, z in zip(chunk, zero) if not z]
            if blank:
                unranked += blank
                rewards.append(task.unretrieved_rewards(blank))
            if ranked:
                env = RetrievalVectorEnv(num_envs=len(ranked), task=task)
                env.reset(options={"query_ids": ranked})
                _, reward, _, _, info = env.step(embeddings[~zero] if zero.any() else embeddings)
                final = info["final_info"]
                for qid, doc_ids, scores in zip(final["query_id"], final["top_k_ids"], final["top_k_scores"]):
                    run[qid] = dict(zip(doc_ids, scores))
                rewards.append(reward)
            bar.update(len(chunk))
    if unranked:
        log.warning(
            "%d of %d queries were embedded as zero vectors (empty, only stopwords, or no token the agent knows): "
            "they retrieve nothing and score 0; the first is %r: %r",
            len(unranked), len(ids), unranked[0], task.query_text(unranked[0]),
        )
    return AgentEvaluation(
        evaluate_run(run, task.dataset.qrels, metrics), run, float(np.concatenate(rewards).mean()), tuple(unranked)
    )


def _zero_rows(embeddings: np.ndarray, n: int) -> np.ndarray:
    """Which of ``n`` embedding rows are exactly zero; none if the shape is wrong (the env reports that)."""
    if embeddings.shape[:1] != (n,) or embeddings.ndim != 2:
        return np.zeros(n, dtype=bool)
    return ~embeddings.any(axis=1)


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

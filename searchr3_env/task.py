"""What the single and the vector env share: a query split scored against a corpus.

``RetrievalTask`` is a thin scorer: the documents, their encoder, the index and
the refresh policy belong to a :class:`~searchr3_env.corpus.Corpus`, which
several tasks (a training and a validation split, the sub-envs of one vector
env) share, so a refresh or a full swap reaches all of them. A batch of (query
id, embedding) pairs is scored by letting the corpus refresh whatever stale
rows it must, then one matrix product ranks. ``RetrievalEnv`` and
``RetrievalVectorEnv`` are thin Gymnasium shells around it, so both give the
same rewards for the same actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.error import CustomSpaceError
from gymnasium.vector.utils import create_shared_memory

from .beir import load_beir
from .corpus import Corpus, IndexLike
from .dataset import RetrievalDataset
from .encoders import Encoder, l2_normalise, scale_rows
from .metrics import ndcg
from .refresh import RefreshReport
from .rewards import RewardFn, get_reward

DatasetLike = RetrievalDataset | str | Path | None


def resolve_dataset(dataset: DatasetLike) -> RetrievalDataset:
    """A dataset object as is; ``None`` or ``"synthetic"`` the built-in collection; else a BEIR folder."""
    if isinstance(dataset, RetrievalDataset):
        return dataset
    if dataset is None or dataset == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic()
    return load_beir(dataset)


class QueryText(spaces.Text):
    """The observation space: ``Text`` that refuses Gymnasium's shared memory, which cannot carry it.

    Gymnasium 1.x's ``AsyncVectorEnv`` decodes a ``Text`` space's shared memory
    into strings once, when it is built (only array spaces come back as live
    views), so every later observation would be the blank strings read then.
    Refusing makes ``AsyncVectorEnv`` fail at construction with the way out.
    """


@create_shared_memory.register(QueryText)
def _refuse_shared_memory(space: QueryText, n: int = 1, ctx: Any = None):
    raise CustomSpaceError(
        "SearchR3's query-text observations cannot travel through AsyncVectorEnv's shared memory (Gymnasium reads "
        "Text from it once, so every env would observe blank queries). Use "
        "gymnasium.make_vec('SearchR3-v0', num_envs=N, vectorization_mode='async', "
        "vector_kwargs={'shared_memory': False}), or the native vector env: gymnasium.make_vec('SearchR3-v0', "
        "num_envs=N), which scores all N queries with one matrix product"
    )


@dataclass
class BatchScore:
    """Rewards and diagnostics for a batch of queries, one row each."""

    rewards: np.ndarray  # (n,) float64
    relevant_positions: np.ndarray  # (n, m) index rows of each query's relevant docs, -1 = padding
    ranks: np.ndarray  # (n, m) pessimistic ranks of the relevant docs, 0 = padding
    grades: np.ndarray  # (n, m) their grades, 0 = padding
    top_positions: np.ndarray  # (n, top_k) index rows, best first
    top_scores: np.ndarray  # (n, top_k)
    ndcg10: np.ndarray  # (n,)
    refresh: RefreshReport  # documents re-encoded for this batch, snapshot scored against
    oldest_row_version: np.ndarray  # (n,) stalest row among each query's top-k and relevant docs


class RetrievalTask:
    """A collection split, its versioned document index and a reward over ranks."""

    def __init__(
        self,
        dataset: DatasetLike = None,
        encoder: Encoder | None = None,
        index: IndexLike = None,
        reward: str | RewardFn = "ndcg",
        split: str = "train",
        top_k: int = 10,
        refresh="local",
        progress: bool = False,
        corpus: Corpus | None = None,
    ):
        """``corpus`` shares an existing corpus (then ``encoder``, ``index`` and ``refresh`` are its own); else
        the corpus of (dataset, encoder, index, refresh) is shared with every task made from the same objects."""
        full = resolve_dataset(dataset)
        if corpus is None:
            corpus = Corpus.shared(full, encoder, index, refresh, progress)
        elif corpus.fingerprint != full.corpus_fingerprint:
            raise ValueError(f"corpus {corpus.name!r} holds other documents than dataset {full.name!r}")
        self.corpus = corpus
        self.dataset = full.split(split)
        self.reward_name, self.reward_fn = get_reward(reward)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = min(top_k, len(self.index))
        self.query_ids = self.dataset.judged_query_ids
        if not self.query_ids:
            raise ValueError(f"{self.dataset!r} has no judged queries to draw from")
        self._qpos = {q: i for i, q in enumerate(self.query_ids)}
        # Relevant documents per query as padded (n_queries, max_rel) arrays, ready for batched ranks.
        rel = [self.dataset.relevant(q) for q in self.query_ids]
        width = max(len(r) for r in rel)
        self.rel_positions = np.full((len(rel), width), -1, dtype=np.int64)
        self.rel_grades = np.zeros((len(rel), width), dtype=np.int64)
        for i, judged in enumerate(rel):
            self.rel_positions[i, : len(judged)] = self.index.positions(list(judged))
            self.rel_grades[i, : len(judged)] = list(judged.values())
        # The observation space covers every query of the collection, whatever the split.
        texts = list(full.queries.values())
        self.observation_space = QueryText(
            max_length=max(len(t) for t in texts), min_length=0, charset=frozenset("".join(texts)) or frozenset(" ")
        )
        self.action_space = spaces.Box(-1.0, 1.0, (self.index.dim,), np.float32)

    @property
    def index(self):
        """The corpus's index as it is now (a full refresh swaps it for every task of the corpus)."""
        return self.corpus.index

    @property
    def encoder(self) -> Encoder:
        return self.corpus.encoder

    @property
    def refresh(self):
        return self.corpus.refresh

    @property
    def doc_texts(self):
        """Document texts by index row (what refreshes re-encode)."""
        return self.corpus.texts

    @property
    def dim(self) -> int:
        return self.index.dim

    def query_text(self, query_id: str) -> str:
        return self.dataset.queries[query_id]

    def check_query_id(self, query_id: Any) -> str:
        if query_id not in self._qpos:
            raise ValueError(
                f"query_id {query_id!r} is not a judged query of split {self.dataset.split_name!r} "
                f"of {self.dataset.name!r}"
            )
        return query_id

    def check_actions(self, actions: Any, query_ids: Sequence[str], batched: bool = True) -> np.ndarray:
        """Validate the embeddings for ``query_ids`` and return them unit-normalised as (n, dim) float32.

        ``batched`` actions are (n, dim), one row per query id; a single env's is
        (dim,). Only the direction ranks, so any finite non-zero scale is
        accepted: rows are brought to a safe scale by a power of two (exact, so
        ordinary vectors normalise to the same bits as ``a / |a|`` in float32)
        before their float32 norm is taken. Wrong shape or dtype, NaN/inf and
        exactly-zero vectors raise ``ValueError`` naming the query.
        """
        a = np.asarray(actions)
        want = (len(query_ids), self.dim) if batched else (self.dim,)
        if a.shape != want:
            raise ValueError(f"action: expected shape {want}, got {a.shape} (dtype {a.dtype})")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"action: expected a float array, got dtype {a.dtype}")
        a = a.reshape(-1, self.dim)
        for problem, bad in (
            ("contains NaN or inf", ~np.isfinite(a).all(axis=1)),
            ("is a zero vector, which has no direction", ~a.any(axis=1)),
        ):
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(f"action for query {query_ids[row]!r} (row {row}) {problem}")
        return l2_normalise(scale_rows(a).astype(np.float32))

    def score(self, query_ids: list[str], embeddings: np.ndarray) -> BatchScore:
        """Rank the relevant documents of each query against the index: one matrix product."""
        rows = np.array([self._qpos[q] for q in query_ids])
        positions, grades = self.rel_positions[rows], self.rel_grades[rows]
        refresh = self.corpus.prepare(positions, embeddings)
        ranks, top_scores, top_positions = self.index.ranks_and_top_k(embeddings, positions, self.top_k)
        padded = np.where(grades > 0, ranks, np.inf)  # the metrics' padding convention
        touched = np.concatenate([positions, top_positions], axis=1)
        versions = np.where(touched >= 0, self.index.versions[np.maximum(touched, 0)], np.iinfo(np.int64).max)
        return BatchScore(
            rewards=np.asarray(self.reward_fn(padded, grades), dtype=np.float64),
            relevant_positions=positions,
            ranks=ranks,
            grades=grades,
            top_positions=top_positions,
            top_scores=top_scores,
            ndcg10=ndcg(padded, grades, k=10),
            refresh=refresh,
            oldest_row_version=versions.min(axis=1),
        )

    def unretrieved_rewards(self, query_ids: Sequence[str]) -> np.ndarray:
        """(n,) rewards of queries that retrieve nothing: every relevant document at rank inf."""
        grades = self.rel_grades[np.array([self._qpos[q] for q in query_ids], dtype=np.int64)]
        return np.asarray(self.reward_fn(np.full(grades.shape, np.inf), grades), dtype=np.float64)

    def info_row(self, query_id: str, scored: BatchScore, i: int) -> dict[str, Any]:
        """The ``info`` dict of one scored query.

        Per-document values are lists, not arrays: their length varies by query,
        and Gymnasium's vector envs batch arrays as fixed-shape columns.
        """
        valid = scored.grades[i] > 0
        rel_ids = [self.index.doc_ids[p] for p in self.rel_positions[self._qpos[query_id]][valid]]
        return {
            "query_id": query_id,
            "relevant_ids": rel_ids,
            "ranks": scored.ranks[i][valid].tolist(),
            "grades": scored.grades[i][valid].tolist(),
            "top_k_ids": [self.index.doc_ids[p] for p in scored.top_positions[i] if p >= 0],
            "top_k_scores": scored.top_scores[i][scored.top_positions[i] >= 0].tolist(),
            "ndcg@10": float(scored.ndcg10[i]),
            "index_version": self.index.index_version,
            "encoder_version": self.encoder.version,
            "oldest_row_version": int(scored.oldest_row_version[i]),
            "docs_reencoded": scored.refresh.docs_reencoded,  # for the whole batch this query was scored in
            "snapshot_id": scored.refresh.snapshot_id,
        }


"""Retrieval metrics with trec_eval's conventions, in two layers.

*Rank primitives* score queries from the ranks of their relevant documents. The
env's rewards and :func:`evaluate_run` both call them, so a reward and a reported
score cannot drift apart. Each takes one query as 1-D arrays, or a batch as
``(batch, max_rel)`` arrays padded with rank ``np.inf`` (and grade 0 for the
graded metrics); ``np.inf`` also marks a relevant document that was not
retrieved. One query gives a float, a batch a ``(batch,)`` float64 array.

*Run evaluation* ranks a run's scores the way trec_eval does and averages over
the judged queries. Conventions, all checked against pytrec_eval:

* ranking: score descending, ties broken by doc id in *descending* string order
  (trec_eval's ``strcmp``), never by input order, so equal scores rank the same
  in every tool;
* relevant means grade > 0; nDCG's gain is the grade itself and its discount
  ``log2(rank + 1)``; the ideal ranking uses every relevant grade of the query;
* ``map@k`` divides by all relevant documents, not ``min(k, n_relevant)``, and
  ``p@k`` by ``k`` even when fewer documents were retrieved (trec_eval's
  ``map_cut`` and ``P``);
* only judged queries (at least one grade > 0) are scored; a judged query the run
  lacks scores 0 on every metric and counts in the mean (trec_eval's ``-c``),
  so leaving out hard queries cannot raise a score; run queries without
  judgements are ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

METRIC_FORMS = ("ndcg", "ndcg@k", "recall@k", "mrr", "mrr@k", "map", "map@k", "p@k")
_METRIC = re.compile(r"(ndcg|recall|mrr|map|p)(?:@([1-9][0-9]*))?")
_NEEDS_K = ("recall", "p")


# ---------------------------------------------------------------- rank primitives


def _as_ranks(ranks) -> tuple[np.ndarray, bool]:
    """``(batch, n)`` float64 ranks and whether the caller gave a single query."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.ndim not in (1, 2):
        raise ValueError(f"ranks must be 1-D (one query) or 2-D (batch, max_rel), got shape {r.shape}")
    if np.isnan(r).any() or (r < 1).any():
        raise ValueError("ranks are 1-based (np.inf for not retrieved or padding); got a value < 1 or NaN")
    return (r[None, :] if r.ndim == 1 else r), r.ndim == 1


def _as_grades(grades, shape: tuple[int, ...]) -> np.ndarray:
    g = np.asarray(grades, dtype=np.float64)
    g = g[None, :] if g.ndim == 1 else g
    if g.shape != shape:
        raise ValueError(f"grades must have the shape of ranks {shape}, got {g.shape}")
    if (g < 0).any():
        raise ValueError("grades must be >= 0 (0 is padding)")
    return g


def _as_n_relevant(n_relevant, r: np.ndarray) -> np.ndarray:
    """``(batch,)`` counts; fewer than the retrieved relevant documents given is a caller bug."""
    n = np.asarray(n_relevant, dtype=np.float64)
    if n.shape not in ((), r.shape[:1]):
        raise ValueError(f"n_relevant must be a scalar or have shape {r.shape[:1]}, got {n.shape}")
    n = np.broadcast_to(n, r.shape[:1])
    if (n < np.isfinite(r).sum(axis=1)).any():
        raise ValueError("n_relevant must be at least the number of finite ranks given for the query")
    return n


def _within(r: np.ndarray, k: int | None) -> np.ndarray:
    """Mask of ranks inside the cut-off; k=None is full depth, every finite rank."""
    if k is None:
        return np.isfinite(r)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int or None (full depth), got {k!r}")
    return r <= k


def _out(values: np.ndarray, single: bool):
    return float(values[0]) if single else values


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0: a query with nothing to find scores 0, not NaN."""
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _dcg(r: np.ndarray, g: np.ndarray, k: int | None) -> np.ndarray:
    return np.where(_within(r, k), g / np.log2(r + 1.0), 0.0).sum(axis=1)


def dcg(ranks, grades, k: int | None = None):
    """Discounted cumulative gain: sum of grade / log2(rank + 1) over ranks <= k."""
    r, single = _as_ranks(ranks)
    return _out(_dcg(r, _as_grades(grades, r.shape), k), single)


def ndcg(ranks, grades, k: int | None = None):
    """DCG over the ideal DCG of the query's grades sorted best first, both cut at k; 0 if no grade > 0."""
    r, single = _as_ranks(ranks)
    g = _as_grades(grades, r.shape)
    ideal_grades = -np.sort(-g, axis=1)
    ideal_ranks = np.broadcast_to(np.arange(1, g.shape[1] + 1, dtype=np.float64), g.shape)
    return _out(_safe_div(_dcg(r, g, k), _dcg(ideal_ranks, ideal_grades, k)), single)


def recall(ranks, n_relevant, k: int | None):
    """Share of the query's relevant documents ranked <= k (k=None: anywhere in the run)."""
    r, single = _as_ranks(ranks)
    n = _as_n_relevant(n_relevant, r)
    return _out(_safe_div(_within(r, k).sum(axis=1).astype(np.float64), n), single)


def precision(ranks, k: int):
    """Relevant documents ranked <= k, divided by k (also when fewer than k were retrieved)."""
    if k is None:
        raise ValueError("precision needs a cut-off k")
    r, single = _as_ranks(ranks)
    return _out(_within(r, k).sum(axis=1) / k, single)


def reciprocal_rank(ranks, k: int | None = None):
    """1 / the best rank of a relevant document, 0 if none is ranked <= k."""
    r, single = _as_ranks(ranks)
    best = r.min(axis=1, initial=math.inf)
    return _out(np.where(_within(best, k), 1.0 / best, 0.0), single)


def average_precision(ranks, n_relevant, k: int | None = None):
    """Sum of precision at each relevant rank <= k, over all relevant documents.

    The j-th best-ranked relevant document at rank r adds j / r, which stays within
    [0, 1] also for the pessimistic (tied) ranks the env gives.
    """
    r, single = _as_ranks(ranks)
    n = _as_n_relevant(n_relevant, r)
    r = np.sort(r, axis=1)
    j = np.arange(1, r.shape[1] + 1, dtype=np.float64)
    hits = np.where(_within(r, k), j / r, 0.0).sum(axis=1)
    return _out(_safe_div(hits, n), single)


# ---------------------------------------------------------------- run evaluation


def parse_metric(name: str) -> tuple[str, int | None]:
    """``'ndcg@10'`` -> ``('ndcg', 10)``; ValueError naming the valid forms for anything else."""
    m = _METRIC.fullmatch(name) if isinstance(name, str) else None
    if m is None or (m[1] in _NEEDS_K and m[2] is None):
        raise ValueError(f"unknown metric {name!r}; valid forms: {', '.join(METRIC_FORMS)} (k a positive integer)")
    return m[1], None if m[2] is None else int(m[2])


def _metric_values(family: str, k: int | None, r: np.ndarray, g: np.ndarray, n: np.ndarray) -> np.ndarray:
    if family == "ndcg":
        return ndcg(r, g, k)
    if family == "recall":
        return recall(r, n, k)
    if family == "mrr":
        return reciprocal_rank(r, k)
    if family == "map":
        return average_precision(r, n, k)
    return precision(r, k)


def rank_documents(doc_scores: Mapping[str, float]) -> list[str]:
    """Doc ids best first as trec_eval ranks them: score descending, ties by doc id descending."""
    items = [(float(score), doc_id) for doc_id, score in doc_scores.items()]
    nan = next((d for s, d in items if s != s), None)
    if nan is not None:
        raise ValueError(f"document {nan!r} has a NaN score, which cannot be ranked")
    items.sort(reverse=True)
    return [doc_id for _, doc_id in items]


@dataclass(frozen=True)
class RunEvaluation:
    """Per-query scores of every judged query and their means (judged queries the run lacks count as 0)."""

    mean: dict[str, float]
    per_query: dict[str, dict[str, float]]


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Sequence[str] = ("ndcg@10", "recall@100", "mrr@10", "map"),
) -> RunEvaluation:
    """Score ``run[qid][doc_id] = score`` against graded ``qrels`` as trec_eval ``-c`` would.

    ``metrics`` are names such as ``ndcg@10`` (see ``METRIC_FORMS``; one name
    alone is accepted too). ``mrr@k`` is the reciprocal rank on the run cut to k.
    See the module docstring for ranking, judged-query and missing-query conventions.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    parsed = [parse_metric(m) for m in metrics]
    relevant = {q: {d: g for d, g in judged.items() if g > 0} for q, judged in qrels.items()}
    relevant = {q: rel for q, rel in relevant.items() if rel}
    if not relevant:
        raise ValueError("qrels judge no document relevant (grade > 0): there is nothing to evaluate")

    width = max(len(rel) for rel in relevant.values())
    ranks = np.full((len(relevant), width), np.inf)
    grades = np.zeros((len(relevant), width))
    n_rel = np.zeros(len(relevant))
    for row, (qid, rel) in enumerate(relevant.items()):
        rank_of = {d: i for i, d in enumerate(rank_documents(run.get(qid, {})), 1)}
        ranks[row, : len(rel)] = [rank_of.get(d, np.inf) for d in rel]
        grades[row, : len(rel)] = list(rel.values())
        n_rel[row] = len(rel)

    values = {name: _metric_values(family, k, ranks, grades, n_rel) for name, (family, k) in zip(metrics, parsed)}
    per_query = {qid: {name: float(v[row]) for name, v in values.items()} for row, qid in enumerate(relevant)}
    return RunEvaluation({name: float(v.mean()) for name, v in values.items()}, per_query)

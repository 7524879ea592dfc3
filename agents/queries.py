"""Which queries train: qrels pairs with mined hard negatives, corpus pseudo-queries, held-out splits.

Both stages draw their queries here (SFT its training pairs, GRPO its rollout
prompts), always from the train split: the test split is never seen. Every
random choice takes an explicit seed, so a resumed run draws the same queries.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from searchr3_env.dataset import RetrievalDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainQuery:
    """A training query: its text, the documents it should retrieve, and mined hard negatives."""

    text: str
    positives: tuple[tuple[str, str], ...]  # (doc id, text the query should retrieve)
    relevant: frozenset[str]  # every doc id that must never serve as its negative
    negatives: tuple[str, ...]  # mined doc ids, hardest first
    source: str  # "qrels" or "pseudo"


def pseudo_queries(dataset: RetrievalDataset, n: int, rng: np.random.Generator,
                   titles: bool = True) -> list[tuple[str, str, str]]:
    """Up to n (query, doc id, positive text): title -> body where a document has both (and ``titles``), else an
    excerpt of the body (:func:`body_excerpt`) -> the whole document."""
    out = []
    for doc_id in rng.permutation(dataset.doc_ids):
        if len(out) >= n:
            break
        doc = dataset.corpus[doc_id]
        if titles and doc.title and doc.text:
            out.append((doc.title, doc_id, doc.text))
        elif (excerpt := body_excerpt(doc.text, rng)) is not None:
            out.append((excerpt, doc_id, doc.as_text()))
    return out


def body_excerpt(text: str, rng: np.random.Generator) -> str | None:
    """A proper part of a document's body: one of its sentences of >= 5 words (the Inverse Cloze Task's
    pseudo-query), or, where the body is a single sentence or unpunctuated (NPL), a random span of 5 words
    to half the body (a Contriever-style crop). Never the whole body, which would teach the model to match a
    text with itself. None for a body under 10 words."""
    whole = text.strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", whole) if len(s.split()) >= 5 and s != whole]
    if sentences:
        return sentences[rng.integers(len(sentences))]
    words = whole.split()
    if len(words) < 10:
        return None
    length = int(rng.integers(5, len(words) // 2 + 1))
    start = int(rng.integers(len(words) - length + 1))
    return " ".join(words[start : start + length])


def training_queries(train: RetrievalDataset, query_ids: Sequence[str], miner, *, min_pairs: int, mine_depth: int,
                     seed: int) -> list[TrainQuery]:
    """Train-split queries with their positives and up to ``mine_depth`` negatives mined by ``miner`` (an (encoder,
    index) pair), plus corpus pseudo-queries until there are ``min_pairs`` pairs."""
    encoder, index = miner
    specs = [(train.queries[q], [(d, train.corpus[d].as_text()) for d in train.relevant(q)],
              set(train.qrels.get(q, {})), "qrels") for q in query_ids]
    n_pairs = sum(len(p) for _, p, _, _ in specs)
    n_pseudo = max(0, min_pairs - n_pairs)
    for text, doc_id, positive in pseudo_queries(train, n_pseudo, np.random.default_rng([seed, 1])):
        specs.append((text, [(doc_id, positive)], {doc_id}, "pseudo"))
    log.info("training pairs: %d from train-split qrels (%d queries) + %d corpus pseudo-queries%s",
             n_pairs, len(query_ids), len(specs) - len(query_ids),
             "" if n_pseudo == 0 else f" (qrels scarce: fewer than min_pairs={min_pairs})")
    _, top = index.search(encoder.encode_queries([s[0] for s in specs]), mine_depth + 64)
    out = []
    for (text, positives, relevant, source), row in zip(specs, top):
        negatives = [index.doc_ids[p] for p in row if p >= 0 and index.doc_ids[p] not in relevant][: mine_depth]
        out.append(TrainQuery(text, tuple(positives), frozenset(relevant), tuple(negatives), source))
    return out


def rerank_pool(train: RetrievalDataset, query_ids: Sequence[str], miner, pool_size: int) -> RetrievalDataset:
    """Held-out train queries over a candidate pool, for validation when documents are trained.

    The pool is each query's top ``eval_pool`` under the mining index plus its
    judged documents, so one eval costs a few hundred document encodings rather
    than the whole corpus. Its nDCG@10 is a reranking score (higher than full
    retrieval), for learning curves only; the real numbers come from ``searchr3 eval``.
    """
    encoder, index = miner
    _, top = index.search(encoder.encode_queries([train.queries[q] for q in query_ids]), pool_size)
    pool = {index.doc_ids[p] for row in top for p in row if p >= 0}
    pool |= {d for q in query_ids for d in train.qrels.get(q, {})}
    return train.subset(f"{train.name}-val", query_ids, doc_ids=pool)


def split_train_queries(train: RetrievalDataset, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """(training query ids, validation query ids): a seeded draw of n_val judged train queries."""
    judged = train.judged_query_ids
    if n_val >= len(judged):
        raise ValueError(f"val_queries={n_val} leaves no training queries ({len(judged)} judged train queries)")
    val = set(np.random.default_rng([seed, 2]).choice(judged, size=n_val, replace=False).tolist()) if n_val else set()
    return [q for q in judged if q not in val], [q for q in judged if q in val]


def query_collection(data: RetrievalDataset, query_ids: list[str], name: str, n_pseudo: int = 0,
                     seed: int = 0) -> RetrievalDataset:
    """``data``'s corpus with only the queries ``query_ids``, plus ``n_pseudo`` body-excerpt pseudo-queries
    (ids ``pseudo-<doc id>``, each relevant to its own document only)."""
    pseudo = {f"pseudo-{doc_id}": (text, {doc_id: 1})
              for text, doc_id, _ in pseudo_queries(data, n_pseudo, np.random.default_rng([seed, 3]), titles=False)}
    if len(pseudo) < n_pseudo:
        log.warning("%s: only %d documents have a body to excerpt; %d pseudo-queries, not %d",
                    data.name, len(pseudo), len(pseudo), n_pseudo)
    return data.subset(name, query_ids, extra_queries=pseudo)

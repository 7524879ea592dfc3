"""The env's hot paths against the hardware floor, measured in one run.

* Batched exact-rank reward for 1,000 queries on a 100,000 x 384 corpus versus
  the bare ``Q @ D.T`` product on the same arrays (the floor for exact ranks).
  Queries are noisy copies of a relevant document (a trained agent); a second
  case uses random queries (an untrained agent: many documents tie or beat the
  relevant ones, the worst case for the candidate pass).
* One ``env.step`` versus the raw FAISS search of one query on the same corpus.
* ``gymnasium.make("SearchR3-v0")`` time, and encoding throughput per encoder.

Run: ``make bench`` (or ``.venv/bin/python -m pytest benchmarks --benchmark-enable``).
"""

from __future__ import annotations

import faiss
import gymnasium
import numpy as np
import pytest

import searchr3_env
from searchr3_env.index import TIE_RTOL
from searchr3_env import CorpusIndex, Document, HashingEncoder, RetrievalDataset, RetrievalEnv, RetrievalTask

N_DOCS, DIM, N_QUERIES, N_REL = 100_000, 384, 1_000, 3


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    docs = unit(rng.standard_normal((N_DOCS, DIM), dtype=np.float32))
    rel = rng.integers(0, N_DOCS, size=(N_QUERIES, N_REL))
    trained = unit(docs[rel].sum(axis=1) + 0.05 * rng.standard_normal((N_QUERIES, DIM), dtype=np.float32))
    random = unit(rng.standard_normal((N_QUERIES, DIM), dtype=np.float32))
    index = CorpusIndex.from_embeddings([f"d{i}" for i in range(N_DOCS)], docs)
    return index, docs, rel, trained, random


@pytest.mark.benchmark(group="exact-ranks-1000q")
def test_matmul_floor(benchmark, corpus, record):
    _, docs, _, queries, _ = corpus
    benchmark.pedantic(lambda: queries @ docs.T, rounds=5, warmup_rounds=1)
    record(benchmark, "matmul_floor")


@pytest.mark.benchmark(group="exact-ranks-1000q")
@pytest.mark.parametrize("agent", ["trained", "random"])
def test_exact_ranks(benchmark, corpus, record, agent):
    index, docs, rel, trained, random = corpus
    queries = trained if agent == "trained" else random
    ranks = benchmark.pedantic(lambda: index.ranks(queries, rel), rounds=5, warmup_rounds=1)
    # Spot-check against brute force in float64 (ties within the documented rounding margin).
    for i in range(3):
        scores = docs.astype(np.float64) @ queries[i]
        margin = 2 * TIE_RTOL
        lo = [int((scores >= scores[r] + margin).sum()) for r in rel[i]]
        hi = [int((scores >= scores[r] - margin).sum()) for r in rel[i]]
        assert all(a <= r <= b for a, r, b in zip(lo, ranks[i], hi))
    record(benchmark, f"exact_ranks_{agent}_agent", baseline="matmul_floor")


@pytest.fixture(scope="module")
def big_env(corpus):
    index, *_ = corpus
    ids = index.doc_ids
    ds = RetrievalDataset(
        "bench", {d: Document("", d) for d in ids}, {"q": "q"}, {"q": {ids[7]: 1, ids[70]: 1}}
    )

    class Fixed:  # documents are already encoded; the env only needs the protocol
        name, dim, version = "unknown", DIM, 0

    env = RetrievalEnv(task=RetrievalTask(ds, encoder=Fixed(), index=index, split="all"))
    return env, corpus[3][0]


@pytest.mark.benchmark(group="single-step")
def test_faiss_search_one_query(benchmark, corpus, record):
    _, docs, _, queries, _ = corpus
    benchmark(lambda: faiss.knn(queries[:1], docs, 10, metric=faiss.METRIC_INNER_PRODUCT))
    record(benchmark, "faiss_search_1q")


@pytest.mark.benchmark(group="single-step")
def test_numpy_scores_one_query(benchmark, corpus, record):
    """The work a step cannot avoid: every document's score for the query (one matrix-vector product)."""
    _, docs, _, queries, _ = corpus
    benchmark(lambda: docs @ queries[0])
    record(benchmark, "numpy_scores_1q")


@pytest.mark.benchmark(group="single-step")
def test_env_step(benchmark, big_env, record):
    env, action = big_env

    def step():
        env.reset(options={"query_id": "q"})
        return env.step(action)

    benchmark(step)
    record(benchmark, "env_step", baseline=("faiss_search_1q", "numpy_scores_1q"))


@pytest.mark.benchmark(group="make")
def test_make_default_env(benchmark, record):
    benchmark.pedantic(lambda: gymnasium.make("SearchR3-v0"), rounds=3)
    record(benchmark, "make_SearchR3_v0")


def _collection(shared_data, name="cranfield"):
    return searchr3_env.load_beir(shared_data / name)


@pytest.mark.benchmark(group="encode-docs")
def test_hashing_encoder_throughput(benchmark, shared_data, record):
    texts = _collection(shared_data).document_texts()
    encoder = HashingEncoder().fit(texts)
    benchmark.pedantic(lambda: encoder.encode_documents(texts), rounds=3)
    record(benchmark, "hashing_encode_cranfield", docs=len(texts),
           docs_per_s=len(texts) / benchmark.stats.stats.mean if benchmark.stats else None)


@pytest.mark.benchmark(group="encode-docs")
def test_minilm_encoder_throughput(benchmark, shared_data, record):
    pytest.importorskip("sentence_transformers")
    texts = _collection(shared_data).document_texts()[:256]
    encoder = searchr3_env.MiniLMEncoder()
    benchmark.pedantic(lambda: encoder.encode_documents(texts), rounds=2, warmup_rounds=1)
    record(benchmark, "minilm_encode_256_cranfield_docs", docs=len(texts),
           docs_per_s=len(texts) / benchmark.stats.stats.mean if benchmark.stats else None)

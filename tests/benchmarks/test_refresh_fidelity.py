"""Smoke test of benchmarks/refresh_fidelity.py on a tiny synthetic collection (random features, no MiniLM)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from searchr3_env import Document, RetrievalDataset
from searchr3_env.refresh import FrozenDocuments, FullRefresh, LocalRefresh

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("threadpoolctl")


@pytest.fixture
def bench(load_script):
    return load_script("benchmarks/refresh_fidelity.py")


N_DOCS, STEPS = 200, 25


def tiny_collection(seed=0):
    """Random features; each query's feature is a noisy mix of its relevant documents' features."""
    rng = np.random.default_rng(seed)
    doc_features = rng.standard_normal((N_DOCS, 24)).astype(np.float32)
    corpus = {f"d{i}": Document("", f"document {i}") for i in range(N_DOCS)}
    queries, qrels, query_features = {}, {}, []
    for q in range(30):
        rel = rng.choice(N_DOCS, size=4, replace=False)
        queries[f"q{q}"] = f"query {q}"
        qrels[f"q{q}"] = {f"d{r}": 1 for r in rel}
        query_features.append(doc_features[rel].mean(axis=0) + rng.standard_normal(24))
    dataset = RetrievalDataset("tiny", corpus, queries, qrels)
    return dataset, doc_features, list(queries.values()), np.array(query_features, dtype=np.float32)


def test_benchmark_runs_and_full_refresh_every_step_is_the_ground_truth(bench, tmp_path):
    dataset, doc_features, query_texts, query_features = tiny_collection()
    policy_list = [
        ("FrozenDocuments", FrozenDocuments()),
        ("FullRefresh(every=1)", FullRefresh(every=1)),
        ("FullRefresh(every=5)", FullRefresh(every=5)),
        ("LocalRefresh(pool=8, max_staleness=None)", LocalRefresh(pool=8, max_staleness=None)),
        ("LocalRefresh(pool=8, max_staleness=50)", LocalRefresh(pool=8, max_staleness=50)),
        ("whole-corpus pool", LocalRefresh(pool=N_DOCS, max_staleness=None)),
    ]
    truth, results, drift = bench.simulate(
        dataset, doc_features, query_texts, query_features, steps=STEPS, batch=3, dim=8, lr=3e-2, seed=0,
        policy_list=policy_list, progress=False,
    )
    assert drift[-1]["rank_spearman"] < 0.99  # the encoder does drift
    # Version 0 is built up front; versions 1..STEPS-1 each cost a full re-encode.
    assert results["FullRefresh(every=1)"].encodings == (STEPS - 1) * N_DOCS
    assert results["FrozenDocuments"].encodings == 0
    for exact in ("FullRefresh(every=1)", "whole-corpus pool"):
        np.testing.assert_array_equal(results[exact].rewards, truth.rewards)
        np.testing.assert_array_equal(results[exact].ranks, truth.ranks)
    rows = bench.summarise(results, truth)
    assert rows["FullRefresh(every=1)"]["mae"] == 0 and rows["FullRefresh(every=1)"]["spearman"] == 1
    assert rows["FrozenDocuments"]["mae"] > 0

    del rows["whole-corpus pool"]
    scenario = bench.Scenario(3e-2, rows, drift, truth)
    args = argparse.Namespace(steps=STEPS, data=Path("tiny"), dim=8, batch=3)
    bench.write_markdown(tmp_path / "r.md", [scenario], args, "cmd", 1.0)
    bench.plot(tmp_path / "p.png", [scenario], STEPS, "tiny")
    text = (tmp_path / "r.md").read_text()
    assert "FullRefresh(every=1) equals the ground truth at every step: yes" in text
    assert (tmp_path / "p.png").stat().st_size > 0

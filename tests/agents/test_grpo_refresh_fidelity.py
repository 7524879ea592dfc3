"""benchmarks/grpo_refresh_fidelity.py on the tiny random Llama: its comparison against a brute-force reference, and a
whole tiny run (SFT, GRPO with compare steps) that resumes without repeating a comparison.

Lives beside the agents tests for their tiny model and collection fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from searchr3_env.beir import load_beir
from searchr3_env.index import CorpusIndex
from searchr3_env.refresh import LocalRefresh, encode_locally
from searchr3_env.rewards import get_reward
from searchr3_env.task import RetrievalTask

pytest.importorskip("scipy")


@pytest.fixture
def bench(load_script):
    return load_script("benchmarks/grpo_refresh_fidelity.py")


def brute_force_ranks(queries: np.ndarray, docs: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Pessimistic ranks by counting: 1 + other documents scoring at least the relevant one's score (less 1e-6)."""
    scores = queries @ docs.T
    rel = np.take_along_axis(scores, np.maximum(relevant, 0), axis=1)
    counts = (scores[:, None, :] >= rel[:, :, None] - 1e-6).sum(axis=2)
    return np.where(relevant >= 0, counts, 0)


def test_compare_against_brute_force(bench, tiny_beir, tiny_embedder):
    data = load_beir(tiny_beir).split("train")
    torch.manual_seed(0)
    index = CorpusIndex.build(data, tiny_embedder, progress=False)
    with torch.no_grad():  # drift: other weights, a new version, a stale index
        for p in tiny_embedder.model.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std())
    tiny_embedder.bump_version()
    query_ids = data.judged_query_ids[:6]
    queries = tiny_embedder.encode_queries([data.queries[q] for q in query_ids])
    task = RetrievalTask(data, tiny_embedder, index, split="all", top_k=10, refresh=LocalRefresh(pool=3))
    before = bench.copy_index(task.index)
    run_scored = task.score(query_ids, queries)
    full = encode_locally(tiny_embedder, task.doc_texts)
    refreshes = bench.settings(3, None) | {"every row": lambda enc: LocalRefresh(len(full), None, encode=enc)}
    out = bench.compare(data, tiny_embedder, "ndcg", query_ids, queries, before, full, task.doc_texts,
                        refreshes=refreshes, snapshots={"fresh": full, "stale": before.embeddings.copy()},
                        run_scored=run_scored)

    # the reference: ranks and rewards counted by hand over the fresh and the stale rows
    rel = task.rel_positions[[task._qpos[q] for q in query_ids]]
    grades = task.rel_grades[[task._qpos[q] for q in query_ids]]
    valid = grades > 0
    _, reward = get_reward("ndcg")
    truth_ranks = brute_force_ranks(queries, full, rel)
    stale_ranks = brute_force_ranks(queries, before.embeddings, rel)
    truth_reward = reward(np.where(valid, truth_ranks, np.inf), grades)
    stale_reward = reward(np.where(valid, stale_ranks, np.inf), grades)
    assert out["stale"]["truth_ranks"] == truth_ranks[valid].tolist()
    assert out["stale"]["ranks"] == stale_ranks[valid].tolist()
    assert out["stale"]["reward_mae"] == pytest.approx(np.abs(stale_reward - truth_reward).mean(), abs=1e-9)
    assert out["stale"]["exact_ranks"] == pytest.approx((stale_ranks == truth_ranks)[valid].mean())
    assert out["stale"]["reward_mae"] > 0  # the drift changed something, so the check has teeth
    truth_top = np.argsort(-(queries @ full.T), axis=1, kind="stable")[:, :10]
    stale_top = np.argsort(-(queries @ before.embeddings.T), axis=1, kind="stable")[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth_top, stale_top)])
    assert out["stale"]["top10_overlap"] == pytest.approx(overlap)

    for exact in ("fresh", "every row"):  # the truth itself, and a refresh of every row, agree exactly
        assert out[exact]["reward_mae"] == 0 and out[exact]["exact_ranks"] == 1 and out[exact]["top10_overlap"] == 1
    assert out["every row"]["rows"] == len(full)
    # the run's own setting replayed from the index before the step gives the run's scores
    replay = out["LocalRefresh(pool=3, max_staleness=None) [run]"]
    assert replay["rows"] == out["run"]["rows"] == run_scored.refresh.docs_reencoded
    assert replay["ranks"] == out["run"]["ranks"]
    assert out["no refresh this step"]["rows"] == 0
    assert out["no refresh this step"]["ranks"] == out["stale"]["ranks"]
    assert before.versions.max() < tiny_embedder.version  # the copy was not refreshed


def test_tiny_run_records_by_step_and_resumes(bench, tiny_beir, tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    argv = ["--data", str(tiny_beir), "--model", str(tiny_model_dir), "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--figure", str(tmp_path / "fig.png"), "--results-md", str(tmp_path / "r.md"),
            "--threads", "1", "--max-doc-tokens", "16", "--sft-steps", "2", "--sft-hard-negatives", "1",
            "--sft-mine-depth", "5", "--steps", "5", "--queries-per-step", "2", "--group-size", "2",
            "--reasoning-tokens", "2", "--refresh-pool", "3", "--max-staleness", "2", "--checkpoint-every", "2",
            "--compare-every", "2", "--probe-queries", "3"]
    bench.main(argv)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    assert steps[0]["rows"] == 0  # the start index is a full encode by the starting policy
    for s in steps[1:]:
        assert s["rows"] == s["rows_relevant"] + s["rows_pool"] + s["rows_staleness"] == s["docs_reencoded"] > 0
        assert s["rows_relevant"] > 0  # every step refreshes the judged documents of its queries
    comps = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert sorted(c["step"] for c in comps if c.get("complete")) == [0, 2, 4]
    run0 = next(c for c in comps if c.get("setting") == "run" and c["step"] == 0)
    assert run0["reward_mae"] == 0 and run0["exact_ranks"] == 1
    assert {c["batch"] for c in comps if "batch" in c} == {"rollouts", "probe"}
    assert any("FullRefresh(every=2) at its stalest" in c.get("setting", "") for c in comps if c["step"] == 4)
    text = (tmp_path / "r.md").read_text()
    assert text.count(bench.MARKERS[0]) == 1 and "Time split" in text and (tmp_path / "fig.png").is_file()

    bench.main(argv)  # a finished run: nothing is redone, nothing appended twice
    assert len((out / "steps.jsonl").read_text().splitlines()) == len(steps)
    assert len((out / "comparisons.jsonl").read_text().splitlines()) == len(comps)
    assert (tmp_path / "r.md").read_text().count(bench.MARKERS[0]) == 1

"""evaluate_agent: one query without a direction must not sink an evaluation, and must not pass silently."""

import logging

import numpy as np
import pytest

from searchr3_env import Document, RetrievalDataset, RetrievalEnv, RetrievalTask, evaluate_agent
from searchr3_env.metrics import evaluate_run

BAD = {"q_empty": "", "q_stop": "the of and", "q_script": "кошка собака"}


def dataset_with_bad_queries() -> RetrievalDataset:
    corpus = {f"d{i}": Document(f"title {i}", f"text about topic{i % 5} and item{i}") for i in range(30)}
    queries = {f"q{i}": f"topic{i % 5} item{i}" for i in range(5)} | BAD | {"q5": "topic0 item5"}
    qrels = {q: {f"d{i}": 2, f"d{(i + 5) % 30}": 1} for i, q in enumerate(queries)}
    return RetrievalDataset("bad-queries", corpus, queries, qrels)


@pytest.fixture(scope="module")
def task():
    return RetrievalTask(dataset_with_bad_queries(), split="all", top_k=30)


def test_zero_vector_queries_score_zero_and_are_named(task, caplog):
    # Regression: the hashing agent embeds these queries as zero vectors and evaluation died without naming them.
    with caplog.at_level(logging.WARNING, logger="searchr3_env.evaluation"):
        result = evaluate_agent(task.encoder, task, batch_size=4, progress=False)  # one chunk holds only bad queries
    assert result.unranked == tuple(BAD)
    assert "3 of 9 queries were embedded as zero vectors" in caplog.text and "'q_empty': ''" in caplog.text
    per_query = result.metrics.per_query
    assert set(per_query) == set(task.query_ids)
    assert all(v == 0.0 for q in BAD for v in per_query[q].values())
    assert not set(BAD) & set(result.run)
    assert result.metrics == evaluate_run(result.run, task.dataset.qrels)  # the missing queries count as 0
    assert per_query["q0"]["ndcg@10"] > 0.5
    assert result.mean_reward == pytest.approx(np.mean(list(_single_env_rewards(task).values())), rel=1e-12)


def _single_env_rewards(task) -> dict[str, float]:
    """The env's reward per good query; 0 (nothing retrieved) per bad one."""
    env = RetrievalEnv(task=task)
    out = {q: 0.0 for q in BAD}
    for qid in task.query_ids:
        if qid not in BAD:
            obs, _ = env.reset(options={"query_id": qid})
            out[qid] = env.step(task.encoder.encode_queries([obs])[0])[1]
    return out


def test_the_env_still_refuses_a_zero_action(task):
    env = RetrievalEnv(task=task)
    obs, _ = env.reset(options={"query_id": "q_stop"})
    with pytest.raises(ValueError, match=r"action for query 'q_stop' \(row 0\) is a zero vector"):
        env.step(task.encoder.encode_queries([obs])[0])


def test_nan_embedding_is_an_error_naming_the_query(task):
    class NaNOnItem3:
        def encode_queries(self, texts):
            out = task.encoder.encode_queries(texts)
            out[[i for i, t in enumerate(texts) if "item3" in t]] = np.nan
            return out

    with pytest.raises(ValueError, match=r"action for query 'q3' \(row \d\) contains NaN or inf"):
        evaluate_agent(NaNOnItem3(), task, batch_size=4, progress=False)

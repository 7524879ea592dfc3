"""Gymnasium's AsyncVectorEnv over RetrievalEnv: the right query texts, or a construction error that says why."""

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import searchr3_env  # noqa: F401  (registers SearchR3-v0)
from searchr3_env import Document, RetrievalDataset


def small_dataset() -> RetrievalDataset:
    corpus = {f"d{i}": Document("", f"doc about topic{i % 3} number{i}") for i in range(12)}
    queries = {f"q{i}": f"topic{i % 3} number{i}" for i in range(8)}
    qrels = {q: {f"d{i}": 1} for i, q in enumerate(queries)}
    return RetrievalDataset("small", corpus, queries, qrels)


def test_default_async_refuses_shared_memory_with_the_fix():
    # Regression: Gymnasium read Text shared memory once, so every env observed a query of blanks.
    with pytest.raises(ValueError, match="shared_memory") as caught:
        gymnasium.make_vec("SearchR3-v0", num_envs=2, vectorization_mode="async", dataset=small_dataset())
    assert "vector_kwargs={'shared_memory': False}" in str(caught.value.__cause__)
    assert "blank queries" in str(caught.value.__cause__)


def test_async_without_shared_memory_observes_the_drawn_queries():
    dataset = small_dataset()
    vec = gymnasium.make_vec(
        "SearchR3-v0",
        num_envs=3,
        vectorization_mode="async",
        vector_kwargs={"shared_memory": False, "autoreset_mode": AutoresetMode.SAME_STEP},
        dataset=dataset,
        split="all",
    )
    try:
        obs, info = vec.reset(seed=0)
        assert list(obs) == [dataset.queries[q] for q in info["query_id"]]
        next_obs, _, _, _, info = vec.step(np.ones((3, vec.single_action_space.shape[0]), dtype=np.float32))
        assert list(info["final_obs"]) == list(obs)
        assert list(next_obs) == [dataset.queries[q] for q in info["query_id"]]
    finally:
        vec.close()

"""The TRL integration: the env as a GRPOTrainer reward function, and examples/trl_grpo.py on a tiny model."""

from types import SimpleNamespace

import numpy as np
import pytest

from agents.trl_reward import SearchR3Reward, trl_dataset
from searchr3_env.refresh import LocalRefresh
from searchr3_env.task import RetrievalTask
from searchr3_env.vector_env import RetrievalVectorEnv


def test_reward_scores_each_completion_as_the_env_scores_its_embedding(tiny_embedder, tiny_beir):
    task = RetrievalTask(str(tiny_beir), tiny_embedder, split="train", refresh=LocalRefresh(pool=5))
    query_ids = task.query_ids[:3]
    embed, eos = tiny_embedder.embed_id, tiny_embedder.tokenizer.eos_token_id
    reasoning = [[5, 6, embed], [7, eos], [8, 9, 10, 11]]  # emitted; stopped; cut off at the budget of 4
    reward = SearchR3Reward(tiny_embedder, task, budget=4, w_format=0.1)
    got = reward(prompts=None, completions=None, completion_ids=reasoning, query_id=query_ids,
                 trainer_state=SimpleNamespace(global_step=0))
    assert reward.__name__ == "searchr3_ndcg"
    texts = [task.query_text(q) for q in query_ids]
    expected = tiny_embedder.forward(tiny_embedder.query_sequences(texts, [[5, 6, embed], [7], [8, 9, 10, 11]]))
    env = RetrievalVectorEnv(num_envs=3, task=task)
    env.reset(options={"query_ids": query_ids})
    _, env_reward, _, _, _ = env.step(expected.embeddings.detach().numpy())
    np.testing.assert_allclose(got, env_reward + 0.1 * np.array([1.0, 0.5, 0.0]), atol=1e-6)
    # After an optimiser step TRL reports global_step 1: the documents the env uses are now stale.
    reward(prompts=None, completions=None, completion_ids=reasoning, query_id=query_ids,
           trainer_state=SimpleNamespace(global_step=1))
    assert tiny_embedder.version == 1 and task.index.versions.max() == 1


def test_dataset_has_conversational_prompts_and_query_ids(tiny_embedder, tiny_beir):
    pytest.importorskip("datasets", reason="the trl extra brings datasets")
    task = RetrievalTask(str(tiny_beir), tiny_embedder, split="train")
    data = trl_dataset(task, task.query_ids[:2])
    assert data["query_id"] == task.query_ids[:2]
    assert data[0]["prompt"][1] == {"role": "user", "content": task.query_text(task.query_ids[0])}


def test_trl_grpo_example_runs_on_a_tiny_model(load_script, tiny_model_dir, tiny_beir, tmp_path):
    pytest.importorskip("trl", reason="optional extra: pip install 'searchr3[trl]'")
    example = load_script("examples/trl_grpo.py")
    history = example.train(example.Args(model=str(tiny_model_dir), data=str(tiny_beir), output_dir=str(tmp_path),
                                         steps=2, queries=8, num_generations=2, batch_size=4,
                                         max_completion_length=4, max_doc_tokens=16, refresh_pool=5, lr=1e-3))
    rewards = [h["rewards/searchr3_ndcg/mean"] for h in history if "rewards/searchr3_ndcg/mean" in h]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.1 for r in rewards)

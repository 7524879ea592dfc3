"""``ResidualEmbedding`` keeps the env's rewards and info, and Stable-Baselines3's PPO learns through it."""

import gymnasium
import numpy as np
import pytest

import searchr3_env
from searchr3_env import HashingEncoder, ResidualEmbedding


@pytest.fixture(scope="module")
def small():
    """The synthetic collection and a 64-dimensional hashing encoder fitted to it (cheap to index)."""
    dataset = searchr3_env.make_synthetic()
    return dataset, HashingEncoder(dim=64).fit(dataset.document_texts())


def make(small, **wrapper_kwargs):
    dataset, encoder = small
    return ResidualEmbedding(gymnasium.make("SearchR3-v0", dataset=dataset, encoder=encoder), **wrapper_kwargs)


def test_observation_is_the_encoders_query_vector_and_zero_action_its_own_embedding(small):
    env = make(small)
    base = gymnasium.make("SearchR3-v0", task=env.unwrapped.task)
    obs, info = env.reset(seed=3)
    query, base_info = base.reset(seed=3)
    assert info == base_info
    assert env.observation_space.contains(obs) and env.action_space.shape == (64,)
    np.testing.assert_array_equal(obs, small[1].encode_queries([query])[0])
    _, reward, terminated, truncated, info = env.step(np.zeros(64, np.float32))
    _, base_reward, _, _, base_info = base.step(small[1].encode_queries([query])[0])
    assert (reward, terminated, truncated) == (base_reward, True, False)
    assert info.keys() == base_info.keys() and info["ranks"] == base_info["ranks"]


def test_residual_moves_the_embedding_and_its_scale_bounds_how_far(small):
    """A residual pointing at a relevant document: a large scale ranks it first, a tiny one changes nothing."""
    env = make(small, residual_scale=100.0)
    task = env.unwrapped.task
    obs, info = env.reset(options={"query_id": task.query_ids[0]})
    target = task.dataset.relevant(info["query_id"])
    doc_id = max(target, key=target.get)
    toward = task.index.embeddings[task.index.positions([doc_id])[0]]
    _, _, _, _, info = env.step(toward)
    assert info["top_k_ids"][0] == doc_id
    assert env.residual_scale == 100.0 and make(small).residual_scale == pytest.approx(1 / 8)

    tiny = make(small, residual_scale=1e-9)
    tiny.reset(options={"query_id": task.query_ids[0]})
    _, _, _, _, moved = tiny.step(toward)
    tiny.reset(options={"query_id": task.query_ids[0]})
    _, _, _, _, still = tiny.step(np.zeros(64, np.float32))
    assert moved["ranks"] == still["ranks"]


def test_refuses_a_mismatched_or_drifting_encoder(small):
    dataset, encoder = small
    with pytest.raises(ValueError, match="dim 32"):
        make(small, encoder=HashingEncoder(dim=32).fit(dataset.document_texts()))
    with pytest.raises(ValueError, match="residual_scale"):
        make(small, residual_scale=0.0)
    drifting = HashingEncoder(dim=64).fit(dataset.document_texts())
    env = make(small, encoder=drifting)
    env.reset(seed=0)
    drifting.version += 1
    with pytest.raises(RuntimeError, match="frozen"):
        env.reset()


def test_make_vec_env_and_sb3_env_checker(small):
    pytest.importorskip("stable_baselines3", reason="the 'sb3' extra is not installed")
    from stable_baselines3.common.env_checker import check_env
    from stable_baselines3.common.env_util import make_vec_env

    dataset, encoder = small
    vec = make_vec_env(
        "SearchR3-v0", n_envs=3, seed=0, wrapper_class=ResidualEmbedding,
        wrapper_kwargs={"residual_scale": 0.1}, env_kwargs={"dataset": dataset, "encoder": encoder},
    )
    obs = vec.reset()
    assert obs.shape == (3, 64) and obs.dtype == np.float32
    next_obs, rewards, dones, infos = vec.step(np.zeros((3, 64), np.float32))
    assert dones.all() and next_obs.shape == (3, 64)
    for reward, info in zip(rewards, infos):
        assert info["episode"]["r"] == pytest.approx(reward, abs=1e-6) and 0 <= reward <= 1  # Monitor rounds
        assert info["terminal_observation"].shape == (64,) and "ndcg@10" in info
    vec.close()
    check_env(make(small), warn=False)


@pytest.mark.slow
def test_ppo_learns_through_the_wrapper(load_script):
    """Seed 0, the example's settings: the last 512 episodes beat the first 512 by at least 0.02."""
    pytest.importorskip("stable_baselines3", reason="the 'sb3' extra is not installed")
    example = load_script("examples/sb3_ppo.py")
    args = example.Args(seed=0)
    model, rewards, encoder = example.train(args, verbose=0)
    first, last = example.first_last(rewards)
    assert len(rewards) == args.timesteps
    assert last >= first + 0.02, (first, last)
    trained, base = example.evaluate(model, args, encoder, split="train")
    assert trained > base, (trained, base)  # the policy learned corrections, not only to stop its noise

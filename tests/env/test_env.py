"""RetrievalEnv and RetrievalVectorEnv: Gymnasium contract, seeding, rewards against an independent reference."""

import math
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import searchr3_env
from searchr3_env import CorpusIndex, Document, HashingEncoder, RetrievalDataset, RetrievalEnv, RetrievalTask
from searchr3_env.encoders import l2_normalise
from searchr3_env.rewards import get_reward


def tiny_dataset() -> RetrievalDataset:
    corpus = {f"d{i}": Document(f"title {i}", f"text about topic{i % 5} and item{i}") for i in range(40)}
    queries = {f"q{i}": f"topic{i % 5} item{i}" for i in range(12)}
    qrels = {f"q{i}": {f"d{i}": 2, f"d{(i + 5) % 40}": 1} for i in range(12)}
    queries["unjudged"] = "nothing judged here"
    return RetrievalDataset("tiny", corpus, queries, qrels)


@pytest.fixture(scope="module")
def task():
    return RetrievalTask(tiny_dataset(), split="all")


@pytest.fixture(scope="module")
def synthetic_env():
    return gymnasium.make("SearchR3-v0")


def reference_ndcg(scores: np.ndarray, doc_ids: list[str], judged: dict[str, int]) -> float:
    """Full-depth nDCG from a brute-force pessimistic ranking (ties rank the judged doc lower)."""
    dcg = 0.0
    for doc, grade in judged.items():
        s = scores[doc_ids.index(doc)]
        rank = int((scores >= s).sum())
        dcg += grade / math.log2(rank + 1)
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(judged.values(), reverse=True)))
    return dcg / ideal


def test_make_registers_and_passes_env_checker(synthetic_env):
    assert isinstance(synthetic_env.unwrapped, RetrievalEnv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(synthetic_env.unwrapped, skip_render_check=False)
    assert not caught, [str(w.message) for w in caught]


def test_step_rewards_match_brute_force_reference(task):
    env = RetrievalEnv(task=task)
    rng = np.random.default_rng(0)
    for qid in task.query_ids:
        obs, info = env.reset(options={"query_id": qid})
        assert obs == task.dataset.queries[qid] and info["query_id"] == qid
        action = rng.standard_normal(task.dim).astype(np.float32)
        _, reward, terminated, truncated, info = env.step(action)
        assert terminated and not truncated
        scores = task.index.embeddings @ (action / np.linalg.norm(action))
        expected = reference_ndcg(scores, task.index.doc_ids, task.dataset.relevant(qid))
        assert reward == pytest.approx(expected, rel=1e-6)
        assert info["query_id"] == qid and set(info["relevant_ids"]) == set(task.dataset.relevant(qid))
        assert info["index_version"] == task.index.index_version and info["encoder_version"] == 0
        assert len(info["top_k_ids"]) == 10


def test_good_query_embedding_beats_random(task):
    env = RetrievalEnv(task=task)
    good, rand = [], []
    rng = np.random.default_rng(1)
    for qid in task.query_ids:
        obs, _ = env.reset(options={"query_id": qid})
        good.append(env.step(task.encoder.encode_queries([obs])[0])[1])
        env.reset(options={"query_id": qid})
        rand.append(env.step(rng.standard_normal(task.dim).astype(np.float32))[1])
    assert np.mean(good) > np.mean(rand) + 0.2


def test_ties_never_help_the_agent(task):
    # An action orthogonal to every document ties them all: each relevant doc ranks last.
    env = RetrievalEnv(task=task)
    env.reset(options={"query_id": task.query_ids[0]})
    orthogonal = np.zeros(task.dim, dtype=np.float32)
    orthogonal[np.flatnonzero((task.index.embeddings == 0).all(axis=0))[0]] = 1.0
    _, _, _, _, info = env.step(orthogonal)
    assert info["ranks"] == [len(task.index)] * len(info["ranks"])


def test_same_seed_same_queries_and_rewards():
    def trajectory(seed):
        env = gymnasium.make("SearchR3-v0", dataset=tiny_dataset())
        rng = np.random.default_rng(7)
        out = []
        obs, _ = env.reset(seed=seed)
        for _ in range(5):
            _, r, *_ = env.step(rng.standard_normal(env.action_space.shape).astype(np.float32))
            out.append((obs, r))
            obs, _ = env.reset()
        return out

    assert trajectory(3) == trajectory(3)
    assert [o for o, _ in trajectory(3)] != [o for o, _ in trajectory(4)]


@pytest.mark.parametrize(
    "action, message",
    [
        (np.ones(5, dtype=np.float32), "shape"),
        (np.ones((1, 4096), dtype=np.float32), "shape"),
        (np.ones(4096, dtype=np.int64), "dtype"),
        (np.full(4096, np.nan, dtype=np.float32), "NaN"),
        (np.zeros(4096, dtype=np.float32), "zero vector"),
    ],
)
def test_bad_actions_raise_clear_errors(task, action, message):
    env = RetrievalEnv(task=task)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)


def test_non_unit_actions_are_normalised(task):
    env = RetrievalEnv(task=task)
    qid = task.query_ids[2]
    action = np.random.default_rng(2).standard_normal(task.dim).astype(np.float32)
    env.reset(options={"query_id": qid})
    r1 = env.step(action)[1]
    env.reset(options={"query_id": qid})
    assert env.step(action * 37.0)[1] == pytest.approx(r1, rel=1e-6)


SCALES = [1e-30, 1e-20, 1e-5, 3.7, 1e20, 1e25, 1e30, 2.0**-99, 2.0**99]


def scale_test_vectors(task) -> list[tuple[str, np.ndarray]]:
    """(query id, action) pairs: random directions and the hashing encoder's real query embeddings."""
    rng = np.random.default_rng(11)
    qids = task.query_ids[:6]
    real = task.encoder.encode_queries([task.query_text(q) for q in qids[3:]])
    return [(q, rng.standard_normal(task.dim)) for q in qids[:3]] + list(zip(qids[3:], real))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_action_scale_never_changes_the_reward(task, dtype):
    # Regression: 1e25 * v overflowed the float32 norm (ranked last), 1e-30 * v was called a zero vector.
    single = RetrievalEnv(task=task)
    vec = searchr3_env.RetrievalVectorEnv(num_envs=len(SCALES), task=task)
    for qid, v in scale_test_vectors(task):
        v = v.astype(dtype)
        single.reset(options={"query_id": qid})
        _, expected, *_, info = single.step(v)
        for c in SCALES:
            single.reset(options={"query_id": qid})
            _, reward, *_, scaled_info = single.step(c * v)
            assert (reward, scaled_info["ranks"]) == (expected, info["ranks"]), c
        vec.reset(options={"query_id": qid})
        _, rewards, *_ = vec.step(np.stack([c * v for c in SCALES]))
        assert rewards.tolist() == [expected] * len(SCALES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_only_an_exactly_zero_action_is_refused(task, dtype):
    env = RetrievalEnv(task=task)
    best_doc = np.flatnonzero(task.index.embeddings[task.index.positions(["d0"])[0]])
    tiny = np.zeros(task.dim, dtype=dtype)
    tiny[best_doc] = np.finfo(dtype).smallest_subnormal  # not zero, so it has a direction
    env.reset(options={"query_id": "q0"})
    _, reward, *_ = env.step(tiny)
    env.reset(options={"query_id": "q0"})
    assert reward == env.step((tiny > 0).astype(dtype))[1]
    env.reset(options={"query_id": "q0"})
    with pytest.raises(ValueError, match=r"query 'q0' \(row 0\) is a zero vector"):
        env.step(np.zeros(task.dim, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ordinary_actions_normalise_to_the_same_bits_as_before(task, dtype):
    # Golden runs depend on it: the scale-safe path must equal a / |a| computed in float32.
    actions = np.random.default_rng(5).standard_normal((8, task.dim)).astype(dtype)
    actions[4:] /= np.linalg.norm(actions[4:], axis=1, keepdims=True)
    as32 = actions.astype(np.float32)
    expected = as32 / np.linalg.norm(as32, axis=1, keepdims=True)
    np.testing.assert_array_equal(task.check_actions(actions, task.query_ids[:8]), expected)


def test_l2_normalise_is_scale_free_and_exact():
    x = np.random.default_rng(6).standard_normal((4, 64))
    x[3] = 0.0
    for dtype in (np.float32, np.float64):
        base = l2_normalise(x.astype(dtype))
        rows = x[:3].astype(dtype)
        np.testing.assert_array_equal(base[:3], (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32))
        for c in SCALES:
            scaled = l2_normalise(c * x.astype(dtype))
            np.testing.assert_allclose(scaled, base, atol=1e-7, err_msg=str(c))
            assert (scaled[3] == 0).all()
        np.testing.assert_array_equal(l2_normalise(2.0**-99 * x.astype(dtype)), base)


def test_step_without_reset_and_unknown_query(task):
    env = RetrievalEnv(task=task)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(task.dim, dtype=np.float32))
    with pytest.raises(ValueError, match="unjudged"):
        env.reset(options={"query_id": "unjudged"})


@pytest.mark.filterwarnings("ignore:.*not in the possible render_modes")
def test_unsupported_render_mode_is_a_type_error_for_stable_baselines3():
    # SB3's make_vec_env asks for render_mode="rgb_array" and falls back to none only on TypeError.
    for make in (gymnasium.make, lambda *a, **kw: gymnasium.make_vec(*a, num_envs=2, **kw)):
        with pytest.raises(TypeError, match="render_mode") as caught:
            make("SearchR3-v0", render_mode="rgb_array", dataset=tiny_dataset())
        assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError, match=r"one of \['ansi'\], got 'human'"):
        RetrievalEnv(render_mode="human", dataset=tiny_dataset())


def test_single_env_refuses_query_ids_and_unknown_options(task):
    env = RetrievalEnv(task=task)
    with pytest.raises(ValueError, match=r"make_vec\('SearchR3-v0', num_envs=N\).*'query_ids'"):
        env.reset(options={"query_ids": task.query_ids[:2]})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['qid'\]; the options are \['query_id'\]"):
        env.reset(options={"qid": task.query_ids[0]})
    assert env.reset(options={"query_id": None})[1]["query_id"] in task.query_ids


def test_vector_env_refuses_unknown_options(task):
    vec = searchr3_env.RetrievalVectorEnv(num_envs=2, task=task)
    with pytest.raises(ValueError, match=r"\['query_ids_'\]; the options are \['query_id', 'query_ids'\]"):
        vec.reset(options={"query_ids_": task.query_ids[:2]})


def test_split_draws_only_its_queries():
    ds = tiny_dataset()
    for split in ("train", "test"):
        env = RetrievalEnv(dataset=ds, split=split)
        drawn = {env.reset(seed=s)[1]["query_id"] for s in range(30)}
        assert drawn <= set(ds.split(split).judged_query_ids)


@pytest.mark.parametrize("name", ["ndcg", "reciprocal_rank", "neg_log_rank", "recall@1"])
def test_reward_functions(name):
    _, fn = get_reward(name)
    ranks = np.array([[1.0, 3.0], [4.0, np.inf]])
    grades = np.array([[2, 1], [1, 0]])
    expected = {
        "ndcg": [(2 + 1 / 2) / (2 + 1 / math.log2(3)), (1 / math.log2(5)) / 1],
        "reciprocal_rank": [1.0, 0.25],
        "neg_log_rank": [0.0, -math.log(4)],
        "recall@1": [0.5, 0.0],
    }[name]
    np.testing.assert_allclose(fn(ranks, grades), expected, rtol=1e-12)


def test_unknown_reward_is_refused():
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("precision@banana")


def test_index_kwarg_accepts_saved_file_and_refuses_other_corpus(tmp_path, task):
    path = task.index.save(tmp_path / "tiny.npz")
    env = RetrievalEnv(dataset=tiny_dataset(), encoder=task.encoder, index=path, split="all")
    assert len(env.index) == 40
    other = RetrievalDataset("other", {"x": Document("", "x")}, {"q": "x"}, {"q": {"x": 1}})
    with pytest.raises(searchr3_env.IndexFileError, match="corpus"):
        RetrievalEnv(dataset=other, encoder=task.encoder, index=path, split="all")


def test_native_vector_env_equals_single_env(task):
    n = 6
    vec = gymnasium.make_vec("SearchR3-v0", num_envs=n, task=task)
    assert isinstance(vec, searchr3_env.RetrievalVectorEnv)
    qids = task.query_ids[:n]
    obs, _ = vec.reset(seed=0, options={"query_ids": qids})
    actions = np.random.default_rng(3).standard_normal((n, task.dim)).astype(np.float32)
    next_obs, rewards, terminated, truncated, info = vec.step(actions)
    single = RetrievalEnv(task=task)
    for i, qid in enumerate(qids):
        single.reset(options={"query_id": qid})
        assert rewards[i] == pytest.approx(single.step(actions[i])[1], rel=1e-9)
    assert terminated.all() and not truncated.any()
    assert list(info["final_obs"]) == list(obs)
    assert list(info["final_info"]["query_id"]) == qids
    assert len(next_obs) == n and vec.observation_space.contains(next_obs)


def test_vector_env_pins_a_group(task):
    vec = searchr3_env.RetrievalVectorEnv(num_envs=4, task=task)
    obs, info = vec.reset(options={"query_id": task.query_ids[1]})
    assert len(set(obs)) == 1 and set(info["query_id"]) == {task.query_ids[1]}
    with pytest.raises(ValueError, match="3 ids for 4 envs"):
        vec.reset(options={"query_ids": task.query_ids[:3]})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_gymnasium_sync_and_async_vector_envs(mode):
    kwargs = {"autoreset_mode": AutoresetMode.SAME_STEP}
    if mode == "async":
        kwargs["shared_memory"] = False  # Text observations have no shared-memory form
    vec = gymnasium.make_vec(
        "SearchR3-v0", num_envs=2, vectorization_mode=mode, vector_kwargs=kwargs, dataset=tiny_dataset(), split="all"
    )
    try:
        obs, _ = vec.reset(seed=0)
        encoder = HashingEncoder().fit(tiny_dataset().document_texts())
        _, rewards, terminated, _, info = vec.step(encoder.encode_queries(list(obs)))
        assert rewards.shape == (2,) and terminated.all() and (rewards > 0).all()
        assert set(info["final_info"]["query_id"]) <= set(tiny_dataset().judged_query_ids)
    finally:
        vec.close()


def test_index_built_by_other_encoder_is_refused(task):
    index = CorpusIndex(task.index.doc_ids, task.index.embeddings, encoder_name="minilm")
    with pytest.raises(ValueError, match="minilm"):
        RetrievalTask(tiny_dataset(), encoder=task.encoder, index=index)

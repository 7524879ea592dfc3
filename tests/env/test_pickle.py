"""Envs, tasks, indexes and refresh policies survive pickling (Ray and multiprocessing ship them to workers)."""

import pickle

import gymnasium
import numpy as np
import pytest

import searchr3_env  # noqa: F401  (registers SearchR3-v0)
from searchr3_env import CorpusIndex, Document, IndexFileError, RetrievalDataset, RetrievalTask, RetrievalVectorEnv
from searchr3_env.encoders import HashingEncoder
from searchr3_env.refresh import FullRefresh


def small_dataset() -> RetrievalDataset:
    corpus = {f"d{i}": Document(f"title {i}", f"text about topic{i % 5} and item{i}") for i in range(40)}
    queries = {f"q{i}": f"topic{i % 5} item{i}" for i in range(12)}
    qrels = {f"q{i}": {f"d{i}": 2, f"d{(i + 5) % 40}": 1} for i in range(12)}
    return RetrievalDataset("small", corpus, queries, qrels)


def round_trip(obj):
    return pickle.loads(pickle.dumps(obj))


def steps(env, query_ids, seed=0):
    """(reward, info) of one step per query with seeded random actions."""
    actions = np.random.default_rng(seed).standard_normal((len(query_ids), env.action_space.shape[-1]))
    out = []
    for qid, action in zip(query_ids, actions.astype(np.float32)):
        env.reset(options={"query_id": qid})
        out.append(env.step(action)[1:])
    return out


@pytest.mark.parametrize("reward", ["ndcg", "reciprocal_rank", "neg_log_rank", "recall@5"])
def test_env_round_trip_gives_identical_rewards_and_infos(reward):
    # Regression: the built-in rewards were lambdas, so pickle.dumps(env) failed.
    env = gymnasium.make("SearchR3-v0", dataset=small_dataset(), split="all", reward=reward)
    qids = env.unwrapped.task.query_ids
    copy = round_trip(env)
    np.testing.assert_equal(steps(copy, qids), steps(env, qids))


def test_vector_env_round_trip_gives_identical_rewards_and_infos():
    vec = gymnasium.make_vec("SearchR3-v0", num_envs=4, dataset=small_dataset(), split="all")
    vec.reset(seed=3)
    copy = round_trip(vec)  # mid-episode: the copy holds the same drawn queries and RNG state
    actions = np.random.default_rng(1).standard_normal((4, vec.single_action_space.shape[0])).astype(np.float32)
    np.testing.assert_equal(copy.step(actions), vec.step(actions))


def test_factory_index_drops_its_faiss_structure_and_rebuilds_it():
    emb = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    index = CorpusIndex([f"d{i}" for i in range(500)], emb, factory="HNSW8")
    expected = index.search(emb[:5], 3)  # builds the HNSW graph
    copy = round_trip(index)
    assert copy._ann is None
    np.testing.assert_equal(copy.search(emb[:5], 3), expected)


@pytest.fixture()
def saved_index(tmp_path):
    ds = small_dataset()
    path = CorpusIndex.build(ds, HashingEncoder().fit(ds.document_texts()), progress=False).save(tmp_path / "i.npz")
    return path


def test_index_loaded_from_file_pickles_its_path_not_its_matrix(saved_index):
    index = CorpusIndex.load(saved_index)
    payload = pickle.dumps(index)
    assert len(payload) < index.embeddings.nbytes / 50
    copy = pickle.loads(payload)
    np.testing.assert_array_equal(copy.embeddings, index.embeddings)
    np.testing.assert_array_equal(copy.versions, index.versions)
    assert (copy.doc_ids, copy.index_version, copy.positions(["d7"])) == (index.doc_ids, index.index_version, [7])
    queries, positions = index.embeddings[:3], [[0], [1], [2]]
    np.testing.assert_equal(copy.ranks_and_top_k(queries, positions, 5), index.ranks_and_top_k(queries, positions, 5))


def test_index_changed_since_load_pickles_its_arrays(saved_index):
    index = CorpusIndex.load(saved_index)
    index.update([0], index.embeddings[[1]], version=1)
    payload = pickle.dumps(index)
    assert len(payload) > index.embeddings.nbytes
    saved_index.unlink()  # the copy must not need the file
    copy = pickle.loads(payload)
    np.testing.assert_array_equal(copy.embeddings, index.embeddings)
    assert copy.versions[0] == 1 and copy.index_version == index.index_version


def test_unpickling_refuses_an_index_file_that_changed_or_vanished(saved_index):
    payload = pickle.dumps(CorpusIndex.load(saved_index))
    other = CorpusIndex.load(saved_index)
    other.update([0], other.embeddings[[1]], version=1)
    other.save(saved_index)
    with pytest.raises(IndexFileError, match="i.npz: the file changed since this index was pickled"):
        pickle.loads(payload)
    saved_index.unlink()
    with pytest.raises(IndexFileError, match="cannot restore a pickled index from its file: .*no such index file"):
        pickle.loads(payload)


def test_env_over_a_saved_index_pickles_without_the_matrix(saved_index):
    ds = small_dataset()
    encoder = HashingEncoder().fit(ds.document_texts())
    from_file = RetrievalVectorEnv(num_envs=2, dataset=ds, encoder=encoder, index=saved_index)
    in_memory = RetrievalVectorEnv(num_envs=2, dataset=ds, encoder=encoder)
    saved_bytes = len(pickle.dumps(in_memory)) - len(pickle.dumps(from_file))
    assert saved_bytes > 0.95 * from_file.index.embeddings.nbytes


def test_background_full_refresh_pickles_without_its_thread():
    ds = small_dataset()
    encoder = HashingEncoder().fit(ds.document_texts())
    policy = FullRefresh(background=True)
    task = RetrievalTask(ds, encoder=encoder, split="all", refresh=policy)
    encoder.version = 1  # same weights, new version: every row is stale
    queries = encoder.encode_queries([task.query_text(q) for q in task.query_ids[:2]])
    task.score(task.query_ids[:2], queries)  # starts the background rebuild
    copy = round_trip(task)
    policy.wait()
    assert copy.refresh._thread is None
    copy.score(copy.query_ids[:2], queries)  # restarts the rebuild in the copy, under a fresh lock
    copy.refresh.wait()
    scored = copy.score(copy.query_ids[:2], queries)
    assert scored.refresh.snapshot_id == 1 and set(copy.index.versions) == {1}
    np.testing.assert_array_equal(scored.rewards, task.score(task.query_ids[:2], queries).rewards)

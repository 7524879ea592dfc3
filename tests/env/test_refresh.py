"""Refresh policies against the ground truth: a fresh full re-encode with the current encoder."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest

from searchr3_env import CorpusIndex, Document, RetrievalDataset, RetrievalTask, RetrievalVectorEnv
from searchr3_env.encoders import HashingEncoder, l2_normalise
from searchr3_env.refresh import FrozenDocuments, FullRefresh, LocalRefresh, get_policy


class DriftingEncoder:
    """Hashing features times a matrix that changes with every version (a stand-in for RL updates).

    Counts how often each text is encoded, so tests can check what was re-encoded.
    """

    name = "drifting"

    def __init__(self, texts, dim=64, drift=0.3, seed=0, delay=0.0):
        self.base = HashingEncoder(dim=dim).fit(texts)
        self.dim, self.version, self.drift, self.delay = dim, 0, drift, delay
        self.rng = np.random.default_rng(seed)
        self.matrix = np.eye(dim, dtype=np.float32)
        self.encoded = Counter()

    def step(self):
        """One 'optimiser step': new weights, new version."""
        self.matrix = self.matrix + self.drift * self.rng.standard_normal((self.dim, self.dim)).astype(np.float32) / 8
        self.version += 1

    def encode_documents(self, texts):
        self.encoded.update(texts)
        time.sleep(self.delay * len(texts))
        return l2_normalise(self.base.encode_documents(texts) @ self.matrix)

    def encode_queries(self, texts):
        return l2_normalise(self.base.encode_queries(texts) @ self.matrix)


def dataset(n_docs=300, n_queries=40, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(150)]
    corpus = {f"d{i}": Document(f"doc {i}", " ".join(rng.choice(words, 12))) for i in range(n_docs)}
    queries, qrels = {}, {}
    for q in range(n_queries):
        rel = rng.choice(n_docs, size=3, replace=False)
        queries[f"q{q}"] = " ".join(corpus[f"d{rel[0]}"].text.split()[:4])
        qrels[f"q{q}"] = {f"d{r}": int(g) for r, g in zip(rel, (2, 1, 1))}
    return RetrievalDataset("drift", corpus, queries, qrels)


def fresh_ranks(task: RetrievalTask, query_ids, queries):
    """Ground truth: ranks against an index freshly encoded by the current encoder."""
    fresh = CorpusIndex(task.index.doc_ids, task.encoder.encode_documents(task.doc_texts), task.encoder.version)
    rows = [task._qpos[q] for q in query_ids]
    return fresh.ranks(queries, task.rel_positions[rows])


def make_task(policy, **encoder_kwargs):
    ds = dataset()
    encoder = DriftingEncoder(ds.document_texts(), **encoder_kwargs)
    return RetrievalTask(ds, encoder=encoder, split="all", refresh=policy)


def score(task, query_ids):
    queries = task.encoder.encode_queries([task.dataset.queries[q] for q in query_ids])
    return task.score(query_ids, queries), queries


def test_unchanged_encoder_local_refresh_is_exact_and_free():
    task = make_task(LocalRefresh(pool=20))
    ids = task.query_ids
    scored, queries = score(task, ids)
    assert scored.refresh.docs_reencoded == 0
    np.testing.assert_array_equal(scored.ranks, fresh_ranks(task, ids, queries))


def test_local_refresh_with_whole_corpus_pool_equals_ground_truth_after_drift():
    task = make_task(LocalRefresh(pool=300, max_staleness=None))
    for _ in range(3):
        task.encoder.step()
        scored, queries = score(task, task.query_ids[:8])
        np.testing.assert_array_equal(scored.ranks, fresh_ranks(task, task.query_ids[:8], queries))


def test_local_refresh_reencodes_only_the_pool_once_per_version():
    policy = LocalRefresh(pool=10, max_staleness=None, max_rounds=1)
    task = make_task(policy)
    task.encoder.step()
    ids = task.query_ids[:6] + task.query_ids[:6]  # repeated queries in one vector step
    queries = task.encoder.encode_queries([task.dataset.queries[q] for q in ids])
    expected = policy.rows_to_refresh(task, task.rel_positions[[task._qpos[q] for q in ids]], queries)
    task.encoder.encoded.clear()
    scored = task.score(ids, queries)
    assert scored.refresh.docs_reencoded == len(expected) <= 6 * (10 + 3)
    assert max(task.encoder.encoded.values()) == 1  # each document at most once per version
    assert set(np.flatnonzero(task.index.versions == 1)) == set(expected)
    # The refreshed rows (pool: top of the ranking + relevant docs) are scored fresh.
    fresh = task.encoder.encode_documents([task.doc_texts[p] for p in expected])
    np.testing.assert_allclose(task.index.embeddings[expected], fresh, rtol=1e-6)
    # A second batch at the same version re-encodes nothing it already did (only rows that the
    # refreshed scores pulled into the top-10 since).
    first = {task.doc_texts[p] for p in expected}
    task.encoder.encoded.clear()
    task.score(ids, queries)
    assert not first & set(task.encoder.encoded)


def test_max_staleness_refreshes_old_rows_that_outrank_relevant_documents():
    policy = LocalRefresh(pool=0, max_staleness=1)
    task = make_task(policy)
    for _ in range(3):
        task.encoder.step()
    ids = task.query_ids[:4]
    queries = task.encoder.encode_queries([task.dataset.queries[q] for q in ids])
    touched = task.index.rows_at_least(queries, task.rel_positions[[task._qpos[q] for q in ids]])
    task.score(ids, queries)
    assert (task.index.versions[touched] == 3).all()  # touched rows were 3 versions old > S=1
    untouched = np.setdiff1d(np.arange(len(task.index)), touched)
    assert (task.index.versions[untouched] == 0).all()


def test_frozen_documents_never_reencode():
    task = make_task(FrozenDocuments())
    task.encoder.step()
    scored, _ = score(task, task.query_ids[:5])
    assert scored.refresh.docs_reencoded == 0 and task.index.oldest_version == 0


def test_full_refresh_every_two_versions():
    task = make_task(FullRefresh(every=2))
    reencoded = []
    for _ in range(4):
        task.encoder.step()
        scored, queries = score(task, task.query_ids[:3])
        reencoded.append(scored.refresh.docs_reencoded)
        if scored.refresh.docs_reencoded:
            np.testing.assert_array_equal(scored.ranks, fresh_ranks(task, task.query_ids[:3], queries))
    assert reencoded == [0, 300, 0, 300]
    assert scored.refresh.snapshot_id == 2


def test_background_full_refresh_swaps_whole_snapshots_built_with_a_frozen_encoder():
    policy = FullRefresh(every=1, background=True)
    task = make_task(policy, delay=0.001)  # ~0.3 s per rebuild
    task.encoder.step()
    first, _ = score(task, task.query_ids[:2])  # starts the rebuild, scores the old snapshot
    assert first.refresh.snapshot_id == 0 and task.index.oldest_version == 0
    task.encoder.step()  # an optimiser step during the rebuild must not leak into it
    policy.wait()
    second, _ = score(task, task.query_ids[:2])
    assert second.refresh.snapshot_id == 1 and second.refresh.docs_reencoded == 300
    assert set(task.index.versions) == {1}  # built entirely by version 1


def test_background_refresh_error_is_raised_not_swallowed():
    class Broken(DriftingEncoder):
        def encode_documents(self, texts):
            raise RuntimeError("GPU fell off")

    ds = dataset()
    encoder = Broken(ds.document_texts())
    index = CorpusIndex(ds.doc_ids, DriftingEncoder(ds.document_texts()).encode_documents(ds.document_texts()))
    policy = FullRefresh(background=True)
    task = RetrievalTask(ds, encoder=encoder, index=index, split="all", refresh=policy)
    encoder.version = 1
    score(task, task.query_ids[:1])
    policy.wait()
    with pytest.raises(RuntimeError, match="background corpus refresh failed"):
        score(task, task.query_ids[:1])


def test_vector_env_info_reports_refresh_costs():
    ds = dataset()
    encoder = DriftingEncoder(ds.document_texts())
    env = RetrievalVectorEnv(num_envs=4, dataset=ds, encoder=encoder, split="all", refresh=LocalRefresh(pool=10))
    obs, _ = env.reset(seed=0)
    encoder.step()
    _, _, _, _, info = env.step(encoder.encode_queries(list(obs)))
    final = info["final_info"]
    assert (final["encoder_version"] == 1).all() and (final["docs_reencoded"] > 0).all()
    assert (final["oldest_row_version"] == 1).all()  # pool >= top_k: every top-k and relevant row is fresh
    assert (final["snapshot_id"] == 0).all() and (final["index_version"] >= 1).all()  # one per update round


def test_stale_index_loads_with_a_warning_and_refreshes(tmp_path, caplog):
    ds = dataset()
    encoder = DriftingEncoder(ds.document_texts())
    path = CorpusIndex.build(ds, encoder, progress=False).save(tmp_path / "i.npz")
    encoder.step()
    with caplog.at_level("WARNING"):
        task = RetrievalTask(ds, encoder=encoder, index=path, split="all")
    assert "stale" in caplog.text and "300 of 300" in caplog.text
    assert task.index.oldest_version == 0


def test_get_policy():
    assert isinstance(get_policy("local"), LocalRefresh)
    with pytest.raises(ValueError, match="unknown refresh policy"):
        get_policy("sometimes")
    with pytest.raises(ValueError, match="every"):
        FullRefresh(every=0)


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, pathlib
    sys.path.insert(0, {tests!r})
    from test_refresh import make_task, score
    from searchr3_env.refresh import FullRefresh
    path, marker = pathlib.Path({path!r}), pathlib.Path({marker!r})
    policy = FullRefresh(every=1, background=True, save_to=path)
    task = make_task(policy, delay=0.02)  # ~6 s per rebuild: the kill lands mid-refresh
    task.encoder.delay = 0.0
    task.encoder.step()
    score(task, task.query_ids[:1]); policy.wait(); score(task, task.query_ids[:1])  # snapshot 1 saved
    task.encoder.delay = 0.02
    task.encoder.step()
    score(task, task.query_ids[:1])  # rebuild 2 starts in the background
    marker.write_text("rebuilding")
    policy.wait()
    """
)


def test_killed_during_background_refresh_leaves_last_complete_snapshot(tmp_path):
    path, marker = tmp_path / "snapshot.npz", tmp_path / "marker"
    script = CRASH_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent), path=str(path),
                                 marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the refresh script died before the kill"
            assert time.time() < deadline, "the refresh script never reached the rebuild"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    index = CorpusIndex.load(path)
    assert set(index.versions) == {1} and len(index) == 300  # the complete snapshot of version 1


def test_ray_workers_encode_like_the_local_path():
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    from searchr3_env.distributed import RayCorpusEncoder

    ds = dataset()
    encoder = HashingEncoder(dim=64).fit(ds.document_texts())  # importable by the workers
    task = RetrievalTask(ds, encoder=encoder, split="all", refresh=FullRefresh(encode=RayCorpusEncoder(shard_size=64)))
    encoder.version = 1  # as if the weights changed: the whole corpus is due
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        scored, _ = score(task, task.query_ids[:4])
    finally:
        ray.shutdown()
    assert scored.refresh.docs_reencoded == 300 and set(task.index.versions) == {1}
    np.testing.assert_array_equal(task.index.embeddings, encoder.encode_documents(task.doc_texts))

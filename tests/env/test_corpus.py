"""One corpus per specification: tasks and sub-envs share its rows, a refresh or a swap reaches all of them,
and top-k lists order tied documents by index position."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium
import numpy as np
import pytest

import searchr3_env  # noqa: F401  (registers SearchR3-v0)
from searchr3_env import CorpusIndex, Document, RetrievalDataset, RetrievalTask
from searchr3_env.corpus import Corpus, DocumentTexts
from searchr3_env.refresh import FullRefresh
from test_refresh import DriftingEncoder, dataset, score

PACKAGE = Path(__file__).resolve().parents[2] / "searchr3_env"


def test_a_training_and_a_validation_task_share_one_corpus_and_see_its_full_swap():
    ds = dataset()
    encoder, policy = DriftingEncoder(ds.document_texts()), FullRefresh(every=1)
    train = RetrievalTask(ds, encoder=encoder, split="train", refresh=policy)
    val = RetrievalTask(ds, encoder=encoder, split="test", refresh=policy)
    assert train.corpus is val.corpus and train.index is val.index
    encoder.step()
    before = val.index
    score(train, train.query_ids[:2])  # the training task's step triggers the full refresh
    assert val.index is train.index is not before  # the validation task scores against the new snapshot
    assert set(val.index.versions) == {encoder.version}
    scored, _ = score(val, val.query_ids[:2])
    assert scored.refresh.docs_reencoded == 0  # nothing left stale for it


def test_an_explicit_corpus_is_shared_and_must_hold_the_same_documents():
    ds = dataset()
    corpus = Corpus(ds, refresh="frozen")
    task = RetrievalTask(ds, split="all", corpus=corpus)
    assert task.corpus is corpus and task.encoder is corpus.encoder
    other = RetrievalDataset("other", {"x": Document("", "another text")}, {"q": "text"}, {"q": {"x": 1}})
    with pytest.raises(ValueError, match="holds other documents"):
        RetrievalTask(other, split="all", corpus=corpus)


def test_sync_sub_envs_of_one_spec_share_one_corpus():
    vec = gymnasium.make_vec("SearchR3-v0", num_envs=3, vectorization_mode="sync")
    corpora = {id(env.unwrapped.task.corpus) for env in vec.envs}
    assert len(corpora) == 1
    vec.close()


def test_document_texts_read_like_the_list_they_replace():
    texts = ["first", "zweite Zeile", "", "ünïcödé ✓"]
    stored = DocumentTexts(texts)
    assert list(stored) == texts and len(stored) == 4 and stored[-1] == texts[-1] and stored[1:3] == texts[1:3]
    assert stored.take([3, 0]) == [texts[3], texts[0]]
    with pytest.raises(IndexError):
        stored[4]
    assert stored.nbytes < sum(len(t) + 49 for t in texts) + 8 * 5 + 1


def test_memory_names_every_part():
    corpus = Corpus(dataset(), refresh="frozen")
    parts = corpus.memory()
    assert set(parts) == {"rows", "versions", "doc_ids", "id_to_row", "texts"} and all(v > 0 for v in parts.values())
    assert parts["rows"] == corpus.index.embeddings.nbytes


def test_top_k_orders_ties_by_score_then_position():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    index = CorpusIndex([f"d{i}" for i in range(5)], emb)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    for k, expected in ((1, [0]), (2, [0, 2]), (3, [0, 2, 3]), (4, [0, 2, 3, 4]), (5, [0, 2, 3, 4, 1])):
        _, scores, top = index.ranks_and_top_k(query, np.full((1, 1), -1), k)
        assert top[0].tolist() == expected, k
    # Many ties (a constant score for every row): the first k positions, whatever the partition chose.
    flat = CorpusIndex([f"d{i}" for i in range(200)], np.tile([[1.0, 0.0]], (200, 1)).astype(np.float32))
    assert flat.ranks_and_top_k(query, np.full((1, 1), -1), 7)[2][0].tolist() == list(range(7))


def test_no_import_cycle_in_searchr3_env(imports_of):
    """Imports among the package's modules (TYPE_CHECKING blocks included) never go round in a circle."""
    package_imports, import_cycle = imports_of
    cycle = import_cycle(package_imports(PACKAGE))
    assert cycle is None, " -> ".join(cycle)


def test_save_and_load_state_round_trip_incrementally(tmp_path):
    from searchr3_env.refresh import LocalRefresh

    ds = dataset()
    encoder = DriftingEncoder(ds.document_texts())
    task = RetrievalTask(ds, encoder=encoder, split="all", refresh=LocalRefresh(pool=10))
    first = task.corpus.save_state(tmp_path / "index", "step-000001")
    encoder.step()
    score(task, task.query_ids[:3])  # refreshes some rows
    second = task.corpus.save_state(tmp_path / "index", "step-000002")
    assert json.loads(second.read_text())["segments"][0] == json.loads(first.read_text())["segments"][0]  # same base
    restored = Corpus(ds, encoder=encoder, refresh="frozen")
    for manifest, want in ((first, None), (second, task.index)):
        restored.load_state(manifest)
        if want is not None:
            np.testing.assert_array_equal(restored.index.embeddings, want.embeddings)
            np.testing.assert_array_equal(restored.index.versions, want.versions)
    task.index.save(tmp_path / "old.npz")  # a run saved before segments: a single file still restores
    restored.load_state(tmp_path / "old.npz")
    np.testing.assert_array_equal(restored.index.versions, task.index.versions)

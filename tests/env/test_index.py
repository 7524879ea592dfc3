"""CorpusIndex: exact pessimistic ranks, search, mutation, persistence and crash safety.

References are brute force in float64 over *integer-valued* float32 embeddings, so
every inner product is exact whatever the summation order of BLAS: ties in the
reference are ties in the implementation and vice versa.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pytest

import searchr3_env.index as index_mod
from killed_writer import kill_writer
from searchr3_env.dataset import Document, RetrievalDataset
from searchr3_env.encoders import HashingEncoder
from searchr3_env.index import FORMAT, CorpusIndex, IndexFileError

REPO = Path(__file__).resolve().parents[2]


def int_matrix(rng, n, dim, lo, hi) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=(n, dim)).astype(np.float32)


def ref_ranks(queries, emb, positions) -> np.ndarray:
    """rank = number of rows whose score is >= the given row's score (itself included); 0 for padding."""
    scores = np.asarray(queries, np.float64) @ np.asarray(emb, np.float64).T
    out = np.zeros(positions.shape, dtype=np.int64)
    for i in range(positions.shape[0]):
        for j in range(positions.shape[1]):
            p = positions[i, j]
            if p >= 0:
                out[i, j] = int(np.count_nonzero(scores[i] >= scores[i, p]))
    return out


def ids(n, prefix="d"):
    return [f"{prefix}{i}" for i in range(n)]


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_positions(rng, n_queries, m, n_docs, pad_fraction=0.3):
    pos = rng.integers(0, n_docs, size=(n_queries, m))
    pos[rng.random((n_queries, m)) < pad_fraction] = -1
    return pos


# ---------------------------------------------------------------- ranks


def test_ranks_hand_computed():
    emb = np.array([[3.0], [1.0], [2.0], [2.0], [-5.0]], dtype=np.float32)
    index = CorpusIndex(ids(5), emb)
    got = index.ranks(np.array([[1.0], [-1.0]], dtype=np.float32), np.array([[0, 1, 2, 3, -1], [4, 0, 2, -1, -1]]))
    # query +1: scores 3,1,2,2,-5 -> doc0 1st; doc1 4th; doc2/doc3 tie at 2 -> both count each other: 3
    # query -1: scores -3,-1,-2,-2,5 -> doc4 1st; doc0 last (5); doc2 ties doc3 -> 4
    np.testing.assert_array_equal(got, [[1, 4, 3, 3, 0], [1, 5, 4, 0, 0]])
    assert got.dtype == np.int64


def test_ranks_match_brute_force_on_random_data_with_padding():
    rng = np.random.default_rng(1)
    emb = int_matrix(rng, 400, 16, -40, 40)
    queries = int_matrix(rng, 30, 16, -40, 40)
    pos = random_positions(rng, 30, 9, 400)
    pos[0] = -1  # a query with nothing to rank
    pos[1, :] = np.arange(9)  # no padding at all
    got = CorpusIndex(ids(400), emb).ranks(queries, pos)
    np.testing.assert_array_equal(got, ref_ranks(queries, emb, pos))
    assert (got[0] == 0).all() and (got[pos >= 0] >= 1).all()


@pytest.mark.parametrize("block_floats", [7, 400 * 3, 400 * 8 + 5])
def test_ranks_over_many_small_blocks(monkeypatch, block_floats):
    rng = np.random.default_rng(2)
    emb = int_matrix(rng, 400, 8, -6, 6)  # small range: many exact ties
    queries = int_matrix(rng, 50, 8, -6, 6)
    pos = random_positions(rng, 50, 6, 400)
    index = CorpusIndex(ids(400), emb)
    expected = ref_ranks(queries, emb, pos)
    monkeypatch.setattr(index_mod, "_BLOCK_FLOATS", block_floats)
    np.testing.assert_array_equal(index.ranks(queries, pos), expected)


def test_ranks_duplicate_rows_tie_pessimistically():
    rng = np.random.default_rng(3)
    base = int_matrix(rng, 60, 12, -20, 20)
    emb = np.concatenate([base, base, base])  # every row has two exact copies
    perm = rng.permutation(len(emb))
    emb = emb[perm]
    queries = int_matrix(rng, 20, 12, -20, 20)
    pos = random_positions(rng, 20, 5, len(emb), pad_fraction=0.2)
    got = CorpusIndex(ids(len(emb)), emb).ranks(queries, pos)
    np.testing.assert_array_equal(got, ref_ranks(queries, emb, pos))
    # a row and its copies can never rank better than 3rd
    assert (got[pos >= 0] >= 3).all()
    # the copies of one row get the same rank
    inv = np.argsort(perm)  # inv[k] = new position of original row k
    copies = np.array([[inv[k], inv[k + 60], inv[k + 120]] for k in range(5)])
    cr = CorpusIndex(ids(len(emb)), emb).ranks(queries[:5], copies)
    assert (cr == cr[:, :1]).all()


def test_constant_query_ranks_every_document_last():
    rng = np.random.default_rng(4)
    emb = unit(rng, 250, 16)
    index = CorpusIndex(ids(250), emb)
    zero = np.zeros((3, 16), dtype=np.float32)
    pos = np.array([[0, 17, 249], [5, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(index.ranks(zero, pos), [[250, 250, 250], [250, 0, 0], [0, 0, 0]])
    # identical documents with integer values: every query ties them all
    same = CorpusIndex(ids(100), np.tile(int_matrix(rng, 1, 16, -9, 9), (100, 1)))
    q = int_matrix(rng, 4, 16, -9, 9)
    np.testing.assert_array_equal(same.ranks(q, np.array([[0, 50, 99]] * 4)), np.full((4, 3), 100))


def test_identical_dense_documents_always_tie():
    spread = []
    for n, dim, seed in [(100, 16, 0), (257, 32, 1), (1000, 384, 2), (333, 64, 3), (50, 8, 4), (1000, 16, 5)]:
        rng = np.random.default_rng(seed)
        index = CorpusIndex(ids(n), np.tile(unit(rng, 1, dim), (n, 1)))
        q = rng.standard_normal((5, dim)).astype(np.float32)
        got = index.ranks(q, np.tile(np.arange(n), (5, 1)))
        spread.append(int((got != n).sum()))
    assert spread == [0] * 6


def test_ranks_of_float_data_agree_with_search_order():
    rng = np.random.default_rng(5)
    emb = unit(rng, 500, 32)
    q = unit(rng, 10, 32)
    index = CorpusIndex(ids(500), emb)
    _, top = index.search(q, 5)
    np.testing.assert_array_equal(index.ranks(q, top), np.tile(np.arange(1, 6), (10, 1)))


def test_ranks_and_top_k_agree_with_brute_force(monkeypatch):
    if not hasattr(CorpusIndex, "ranks_and_top_k"):
        pytest.skip("CorpusIndex.ranks_and_top_k not present")
    rng = np.random.default_rng(14)
    emb = int_matrix(rng, 300, 8, -30, 30)
    queries = int_matrix(rng, 25, 8, -30, 30)
    pos = random_positions(rng, 25, 4, 300)
    monkeypatch.setattr(index_mod, "_BLOCK_FLOATS", 300 * 4)
    ranks, top_scores, top_pos = CorpusIndex(ids(300), emb).ranks_and_top_k(queries, pos, 7)
    np.testing.assert_array_equal(ranks, ref_ranks(queries, emb, pos))
    ref = queries.astype(np.float64) @ emb.astype(np.float64).T
    assert top_scores.shape == top_pos.shape == (25, 7)
    np.testing.assert_array_equal(top_scores, -np.sort(-ref, axis=1)[:, :7])
    np.testing.assert_array_equal(np.take_along_axis(ref, top_pos, axis=1), top_scores)
    assert all(len(set(r)) == 7 for r in top_pos)


def test_ranks_input_errors():
    index = CorpusIndex(ids(10), np.eye(10, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(2, m\)"):
        index.ranks(np.ones((2, 10), np.float32), np.zeros((3, 1), dtype=int))
    with pytest.raises(ValueError, match=r"\(n, 10\)"):
        index.ranks(np.ones((2, 9), np.float32), np.zeros((2, 1), dtype=int))
    one = index.ranks(np.ones(10, np.float32), np.array([[3]]))  # a single 1-D query
    np.testing.assert_array_equal(one, [[10]])


def test_ranks_with_no_positions_returns_empty():
    index = CorpusIndex(ids(10), np.eye(10, dtype=np.float32))
    assert index.ranks(np.ones((2, 10), np.float32), np.zeros((2, 0), dtype=np.int64)).shape == (2, 0)


# ---------------------------------------------------------------- search


def test_flat_search_returns_the_exact_top_k():
    rng = np.random.default_rng(6)
    emb = unit(rng, 600, 24)
    q = unit(rng, 15, 24)
    index = CorpusIndex(ids(600), emb)
    scores, pos = index.search(q, 10)
    ref = q.astype(np.float64) @ emb.astype(np.float64).T
    kth = np.sort(ref, axis=1)[:, -10]
    assert scores.shape == pos.shape == (15, 10)
    for i in range(15):
        assert len(set(pos[i])) == 10 and (pos[i] >= 0).all()
        np.testing.assert_allclose(scores[i], ref[i, pos[i]], atol=1e-5)
        assert (np.diff(scores[i]) <= 1e-6).all()  # best first
        assert (ref[i, pos[i]] >= kth[i] - 1e-5).all()
    np.testing.assert_allclose(index.scores(q, pos), scores, atol=1e-5)
    # k larger than the corpus: every document once
    _, allpos = index.search(q[:2], 1000)
    assert all(sorted(r[r >= 0]) == list(range(600)) for r in allpos)


def test_scores_gives_exact_products_and_minus_inf_for_padding():
    emb = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    index = CorpusIndex(ids(3), emb)
    got = index.scores(np.array([[1, 1], [2, 0]], np.float32), np.array([[2, -1], [0, 1]]))
    np.testing.assert_array_equal(got, [[11, -np.inf], [2, 6]])


@pytest.mark.parametrize("factory,min_self_recall", [("HNSW16", 0.95), ("IVF4,Flat", 1.0)])
def test_factory_index_search_reflects_updates_and_adds(factory, min_self_recall):
    rng = np.random.default_rng(7)
    emb = unit(rng, 400, 16)
    index = CorpusIndex(ids(400), emb, factory=factory)
    assert index.factory == factory

    def self_recall(queries, expected):
        s, p = index.search(queries, 3)
        np.testing.assert_allclose(s, index.scores(queries, p), atol=1e-4)
        return float(np.mean(p[:, 0] == expected))

    assert self_recall(emb, np.arange(400)) >= min_self_recall
    new = unit(rng, 50, 16)
    index.update(np.arange(50), new, version=1)
    assert self_recall(new, np.arange(50)) >= min_self_recall
    s, p = index.search(emb[:50], 1)  # the old vectors of rows 0..49 are gone
    assert not np.any(np.isclose(s[:, 0], 1.0, atol=1e-5) & (p[:, 0] < 50))
    added = unit(rng, 30, 16)
    index.add(ids(30, "new"), added, version=2)
    assert self_recall(added, np.arange(400, 430)) >= min_self_recall


@pytest.mark.parametrize("factory", ["Bogus", "IVF,Flat", "Flat,Nope", ""])
def test_bad_factory_string_fails_at_construction(factory):
    with pytest.raises((ValueError, RuntimeError)):
        CorpusIndex(ids(4), np.eye(4, dtype=np.float32), factory=factory)


# ---------------------------------------------------------------- construction and mutation


def test_construction_copies_input_and_exposes_read_only_views():
    emb = np.arange(12, dtype=np.float64).reshape(4, 3)
    index = CorpusIndex(["a", "b", "c", "d"], emb, versions=[0, 1, 2, 3])
    emb[0, 0] = 99
    assert index.embeddings[0, 0] == 0 and index.embeddings.dtype == np.float32
    assert index.dim == 3 and len(index) == 4
    with pytest.raises(ValueError):
        index.embeddings[0, 0] = 1
    with pytest.raises(ValueError):
        index.versions[0] = 7
    np.testing.assert_array_equal(index.versions, [0, 1, 2, 3])
    np.testing.assert_array_equal(index.positions(["d", "a"]), [3, 0])
    with pytest.raises(KeyError, match="'zz'"):
        index.positions(["a", "zz"])
    assert index.index_version == 0


def test_from_embeddings_sets_one_version_and_passes_options():
    index = CorpusIndex.from_embeddings(["x", "y"], np.eye(2), 5, encoder_name="enc", corpus_fingerprint="fp")
    np.testing.assert_array_equal(index.versions, [5, 5])
    assert index.encoder_name == "enc" and index.corpus_fingerprint == "fp" and index.factory == "Flat"


@pytest.mark.parametrize(
    "doc_ids,emb,needles",
    [
        (["a", "b"], np.ones(2, np.float32), ["(2,)", "float32"]),
        (["a", "b"], np.ones((2, 2, 2), np.float32), ["(2, 2, 2)", "float32"]),
        (["a", "b"], np.ones((2, 3), np.int64), ["int64"]),
        (["a", "b"], np.array([[1.0, np.nan], [0, 0]]), ["NaN", "row 0"]),
        (["a", "b"], np.array([[1.0, 0], [np.inf, 0]]), ["inf", "row 1"]),
        (["a", "b", "c"], np.ones((2, 3), np.float32), ["3 doc ids", "2 embedding rows"]),
        (["a", "b", "a"], np.ones((3, 3), np.float32), ["duplicate", "'a'"]),
        ([], np.ones((0, 3), np.float32), ["at least one"]),
    ],
)
def test_constructor_errors_name_the_problem(doc_ids, emb, needles):
    with pytest.raises(ValueError) as err:
        CorpusIndex(doc_ids, emb)
    for needle in needles:
        assert needle in str(err.value)


def test_update_changes_rows_versions_and_index_version():
    rng = np.random.default_rng(8)
    emb = unit(rng, 20, 8)
    index = CorpusIndex(ids(20), emb, versions=0)
    new = unit(rng, 3, 8)
    index.update([4, 0, 19], new, version=2)
    assert index.index_version == 1
    np.testing.assert_array_equal(index.embeddings[[4, 0, 19]], new)
    untouched = np.setdiff1d(np.arange(20), [0, 4, 19])
    np.testing.assert_array_equal(index.embeddings[untouched], emb[untouched])
    np.testing.assert_array_equal(np.flatnonzero(index.versions == 2), [0, 4, 19])
    np.testing.assert_array_equal(index.stale_rows(2), untouched)
    np.testing.assert_array_equal(index.stale_rows(3), np.arange(20))
    assert index.stale_rows(0).size == 0
    index.update([1], unit(rng, 1, 8), version=1)
    assert index.index_version == 2
    np.testing.assert_array_equal(index.stale_rows(2), untouched)  # row 1 (version 1) is still stale for 2
    np.testing.assert_array_equal(index.stale_rows(1), np.setdiff1d(untouched, [1]))
    index.update([], np.zeros((0, 8), np.float32), version=9)
    assert index.index_version == 3  # a mutation call, even an empty one, is counted


@pytest.mark.parametrize(
    "positions,emb,exc,needles",
    [
        ([0], np.ones((1, 7), np.float32), ValueError, ["(1, 7)", "float32", "(n, 8)"]),
        ([0], np.ones((1, 8), np.int32), ValueError, ["int32"]),
        ([0, 1], np.array([[0.0] * 8, [np.nan] * 8]), ValueError, ["NaN", "row 1"]),
        ([0, 1], np.ones((1, 8), np.float32), ValueError, ["2 positions", "1 embedding rows"]),
        ([20], np.ones((1, 8), np.float32), IndexError, ["[0, 20)"]),
        ([-1], np.ones((1, 8), np.float32), IndexError, ["[0, 20)"]),
    ],
)
def test_bad_update_is_refused_without_changing_anything(positions, emb, exc, needles):
    rng = np.random.default_rng(9)
    start = unit(rng, 20, 8)
    index = CorpusIndex(ids(20), start)
    with pytest.raises(exc) as err:
        index.update(positions, emb, version=1)
    for needle in needles:
        assert needle in str(err.value)
    assert index.index_version == 0
    np.testing.assert_array_equal(index.embeddings, start)
    assert (index.versions == 0).all()


def test_add_appends_rows_with_their_version():
    rng = np.random.default_rng(10)
    emb = unit(rng, 5, 4)
    index = CorpusIndex(ids(5), emb, versions=1)
    extra = unit(rng, 2, 4)
    index.add(["new-a", "new-b"], extra, version=3)
    assert len(index) == 7 and index.doc_ids[-2:] == ["new-a", "new-b"]
    assert index.index_version == 1
    np.testing.assert_array_equal(index.positions(["new-b", "d0"]), [6, 0])
    np.testing.assert_array_equal(index.embeddings[5:], extra)
    np.testing.assert_array_equal(index.versions, [1, 1, 1, 1, 1, 3, 3])
    np.testing.assert_array_equal(index.stale_rows(3), np.arange(5))
    with pytest.raises(ValueError, match="'d2'"):
        index.add(["zz", "d2"], unit(rng, 2, 4), version=4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        index.add(["zz"], np.ones((1, 5), np.float32), version=4)
    with pytest.raises(ValueError, match="2 doc ids"):
        index.add(["zz", "yy"], np.ones((1, 4), np.float32), version=4)
    assert len(index) == 7 and index.index_version == 1 and "zz" not in index.doc_ids


def test_add_refuses_an_id_repeated_within_the_batch():
    index = CorpusIndex(ids(3), np.eye(3, dtype=np.float32))
    try:
        index.add(["x", "x"], np.eye(3, dtype=np.float32)[:2], version=1)
    except ValueError as err:
        assert "'x'" in str(err)
    assert len(index) == len(set(index.doc_ids))


class _FakeEncoder:
    name = "fake-enc"
    dim = 3
    version = 4

    def __init__(self, bad_shape=False):
        self.calls = []
        self.bad_shape = bad_shape

    def encode_documents(self, texts):
        self.calls.append(len(texts))
        out = np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)
        return out[:, :2] if self.bad_shape else out

    def encode_queries(self, texts):
        return self.encode_documents(texts)


def small_dataset():
    corpus = {
        "d1": Document("Cats", "cats purr and sleep"),
        "d2": Document("", "dogs bark at the mail carrier"),
        "d3": Document("Birds", ""),
        "d4": Document("Fish", "fish swim; cats watch fish"),
        "d5": Document("", "a banana a day"),
    }
    return RetrievalDataset("pets", corpus, {"q1": "cats"}, {"q1": {"d1": 1}})


def test_build_encodes_the_corpus_and_records_its_provenance():
    ds = small_dataset()
    enc = HashingEncoder(dim=64).fit(ds.document_texts())
    index = CorpusIndex.build(ds, enc, batch_size=2, progress=False)
    assert index.doc_ids == ds.doc_ids
    assert index.encoder_name == "hashing"
    assert index.corpus_fingerprint == ds.corpus_fingerprint
    np.testing.assert_array_equal(index.versions, np.full(5, enc.version))
    np.testing.assert_allclose(index.embeddings, enc.encode_documents(ds.document_texts()), atol=1e-6)
    m = index.manifest()
    assert m["encoder_name"] == "hashing" and m["corpus_fingerprint"] == ds.corpus_fingerprint
    assert m["rows"] == 5 and m["dim"] == 64 and m["encoder_version"] == enc.version
    # the query about cats finds a cat document first
    _, top = index.search(enc.encode_queries(["cats"]), 2)
    assert {ds.doc_ids[p] for p in top[0]} <= {"d1", "d4"}


def test_build_batches_and_versions_with_another_encoder():
    ds = small_dataset()
    enc = _FakeEncoder()
    index = CorpusIndex.build(ds, enc, batch_size=2, progress=False, factory="Flat")
    assert enc.calls == [2, 2, 1]
    assert index.encoder_name == "fake-enc" and (index.versions == 4).all()
    np.testing.assert_array_equal(index.embeddings[:, 0], [len(t) for t in ds.document_texts()])
    with pytest.raises(ValueError, match="fake-enc"):
        CorpusIndex.build(ds, _FakeEncoder(bad_shape=True), progress=False)


# ---------------------------------------------------------------- save / load


def read_manifest(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(bytes(np.load(io.BytesIO(z.read("manifest.npy")))).decode())


def rezip(src: Path, dst: Path, edit) -> None:
    """Copy an index file member by member (fresh CRCs), passing each member's bytes through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))


def edit_manifest(fn):
    def edit(name, data):
        if name != "manifest.npy":
            return data
        manifest = json.loads(bytes(np.load(io.BytesIO(data))).decode())
        new = fn(manifest)
        raw = new if isinstance(new, bytes) else json.dumps(new).encode()
        buf = io.BytesIO()
        np.save(buf, np.frombuffer(raw, dtype=np.uint8))
        return buf.getvalue()

    return edit


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(11)
    doc_ids = ["plain", "ünïcödé/ß", "with space ", "tab\tid", "日本語"] + ids(195)
    index = CorpusIndex(doc_ids, unit(rng, 200, 12), versions=1, encoder_name="enc-x", corpus_fingerprint="f" * 64)
    index.update([3, 7], unit(rng, 2, 12), version=2)
    index.add(["late"], unit(rng, 1, 12), version=3)
    path = tmp_path / "sub" / "corpus.index"
    assert index.save(path) == path
    return index, path


def test_save_load_round_trip(saved):
    index, path = saved
    loaded = CorpusIndex.load(path)
    assert loaded.doc_ids == index.doc_ids
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert loaded.embeddings.dtype == np.float32
    np.testing.assert_array_equal(loaded.versions, index.versions)
    assert loaded.index_version == index.index_version == 2
    assert loaded.encoder_name == "enc-x" and loaded.factory == "Flat"
    assert loaded.corpus_fingerprint == "f" * 64 and loaded.dim == 12
    np.testing.assert_array_equal(loaded.positions(["late", "tab\tid"]), [200, 3])
    np.testing.assert_array_equal(loaded.stale_rows(3), index.stale_rows(3))
    assert CorpusIndex.load(str(path), corpus_fingerprint="f" * 64, dim=12).doc_ids == index.doc_ids
    m = read_manifest(path)
    assert m["format"] == FORMAT
    assert (m["rows"], m["dim"], m["encoder_version"], m["oldest_row_version"]) == (201, 12, 3, 1)
    assert m["index_version"] == 2 and m["encoder_name"] == "enc-x" and m["factory"] == "Flat"
    assert m["corpus_fingerprint"] == "f" * 64 and len(m["sha256"]) == 64
    # saving again overwrites; nothing else is left in the folder
    loaded.update([0], np.ones((1, 12), np.float32), version=5)
    loaded.save(path)
    assert CorpusIndex.load(path).index_version == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.index"]


def test_round_trip_of_a_factory_index(tmp_path):
    rng = np.random.default_rng(12)
    emb = unit(rng, 300, 8)
    index = CorpusIndex(ids(300), emb, factory="HNSW16")
    index.search(emb[:2], 1)
    index.save(tmp_path / "h")
    loaded = CorpusIndex.load(tmp_path / "h")
    assert loaded.factory == "HNSW16"
    _, p = loaded.search(emb[:20], 1)
    assert np.mean(p[:, 0] == np.arange(20)) >= 0.95


def test_truncated_files_are_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    cuts = sorted({0, 1, 4, 30, 100, len(data) // 4, len(data) // 2, 3 * len(data) // 4, len(data) - 23, len(data) - 1})
    for cut in cuts:
        bad = tmp_path / f"cut{cut}"
        bad.write_bytes(data[:cut])
        with pytest.raises(IndexFileError, match=str(bad)):
            CorpusIndex.load(bad)


def test_flipped_embedding_bytes_are_refused(saved, tmp_path):
    _, path = saved
    for member, offset in (("embeddings.npy", -1), ("embeddings.npy", 200), ("doc_ids.npy", -3), ("versions.npy", -8)):

        def flip(name, data, member=member, offset=offset):
            if name != member:
                return data
            b = bytearray(data)
            b[offset] ^= 0x40
            return bytes(b)

        bad = tmp_path / f"flip-{member}-{offset}"
        rezip(path, bad, flip)
        with pytest.raises(IndexFileError, match="checksum"):
            CorpusIndex.load(bad)
    # the same flip in place (stale zip CRC) is refused too
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("embeddings.npy")
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 300] ^= 0x01
    bad = tmp_path / "inplace"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError):
        CorpusIndex.load(bad)


@pytest.mark.parametrize(
    "what,fn,needle",
    [
        ("format", lambda m: m | {"format": "something-else/9"}, "format"),
        ("checksum", lambda m: m | {"sha256": "0" * 64}, "checksum"),
        ("not json", lambda m: b"{not json", "unreadable"),
        ("not utf-8", lambda m: b"\xff\xfe\x00", "unreadable"),
    ],
)
def test_edited_manifest_is_refused(saved, tmp_path, what, fn, needle):
    _, path = saved
    bad = tmp_path / "edited"
    rezip(path, bad, edit_manifest(fn))
    with pytest.raises(IndexFileError, match=needle):
        CorpusIndex.load(bad)


@pytest.mark.parametrize(
    "field,value",
    [("corpus_fingerprint", "e" * 64), ("dim", 99), ("rows", 3), ("index_version", 12345)],
)
def test_manifest_fields_are_covered_by_the_checksum(saved, tmp_path, field, value):
    _, path = saved
    bad = tmp_path / "edited"
    rezip(path, bad, edit_manifest(lambda m: m | {field: value}))
    with pytest.raises(IndexFileError):
        kwargs = {"corpus_fingerprint": value} if field == "corpus_fingerprint" else {}
        kwargs |= {"dim": value} if field == "dim" else {}
        CorpusIndex.load(bad, **kwargs)


@pytest.mark.parametrize(
    "fn",
    [lambda m: [1, 2], lambda m: {k: v for k, v in m.items() if k != "factory"}, lambda m: m | {"factory": "Bogus"}],
    ids=["list", "missing-factory", "bad-factory"],
)
def test_malformed_manifest_gives_index_file_error(saved, tmp_path, fn):
    _, path = saved
    bad = tmp_path / "edited"
    rezip(path, bad, edit_manifest(fn))
    with pytest.raises(IndexFileError):
        CorpusIndex.load(bad)


def _corrupt_npy_header(raw: bytearray) -> None:
    start = raw.index(b"{'descr'", raw.index(b"doc_ids.npy"))
    raw[start] = ord("z")  # "{'descr': ..." -> "z'descr': ...": unbalanced brackets


def _corrupt_compression_method(raw: bytearray) -> None:
    central = raw.index(b"PK\x01\x02")
    raw[central + 10] = 99  # "compression method 99": not supported


def _corrupt_encryption_flag(raw: bytearray) -> None:
    central = raw.index(b"PK\x01\x02")
    raw[central + 8] |= 0x01  # "encrypted"


@pytest.mark.parametrize("corrupt", [_corrupt_npy_header, _corrupt_compression_method, _corrupt_encryption_flag])
def test_single_byte_corruptions_give_index_file_error(saved, tmp_path, corrupt):
    _, path = saved
    raw = bytearray(path.read_bytes())
    corrupt(raw)
    bad = tmp_path / "corrupt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError):
        CorpusIndex.load(bad)


def test_index_for_another_corpus_or_dim_is_refused(saved):
    _, path = saved
    with pytest.raises(IndexFileError, match="corpus"):
        CorpusIndex.load(path, corpus_fingerprint="0" * 64)
    with pytest.raises(IndexFileError, match="dim 12, expected 13"):
        CorpusIndex.load(path, dim=13)


def test_non_index_files_are_refused(tmp_path):
    cases = {
        "empty": b"",
        "text.txt": b"hello, world\n",
        "random.bin": np.random.default_rng(0).bytes(5000),
        "json.json": json.dumps({"format": FORMAT}).encode(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "not an index")
    np.savez(tmp_path / "arrays.npz", a=np.arange(3), b=np.ones(2))
    np.savez(tmp_path / "pickled.npz", manifest=np.array([{"a": 1}], dtype=object))
    (tmp_path / "a-folder").mkdir()
    for name in [*cases, "other.zip", "arrays.npz", "pickled.npz", "a-folder", "missing-file"]:
        with pytest.raises(IndexFileError, match=name):
            CorpusIndex.load(tmp_path / name)


def test_plain_npy_file_is_refused(tmp_path):
    np.save(tmp_path / "array.npy", np.ones((3, 4), np.float32))
    with pytest.raises(IndexFileError):
        CorpusIndex.load(tmp_path / "array.npy")


def test_index_file_error_is_a_value_error():
    assert issubclass(IndexFileError, ValueError)


# ---------------------------------------------------------------- crash safety

_WRITER = r"""
import os, sys, time
import numpy as np
from searchr3_env.index import CorpusIndex

path, mode, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
n, dim = 20000, 64
say = lambda *a: print(*a, flush=True)
if mode == "slow-write":  # write in small slow chunks, so a kill leaves a partial temp file
    real_fdopen = os.fdopen

    class Slow:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): return self.f.__exit__(*a)
        def __getattr__(self, k): return getattr(self.f, k)
        def write(self, data):
            mv = memoryview(data).cast("B")
            say("writing", len(mv))
            for i in range(0, len(mv), 1 << 18):
                self.f.write(mv[i:i + (1 << 18)]); self.f.flush(); time.sleep(0.02)

    os.fdopen = lambda *a, **k: Slow(real_fdopen(*a, **k))
elif mode == "slow-replace":  # the temp file is complete, the rename has not happened
    real_replace = os.replace
    def slow_replace(a, b):
        say("replacing")
        time.sleep(5)
        real_replace(a, b)
    os.replace = slow_replace

index = CorpusIndex([f"d{i}" for i in range(n)], np.zeros((n, dim), np.float32), first)
gen = first
while True:
    index.update(np.arange(n), np.full((n, dim), gen, np.float32), gen)
    say("saving", gen)
    index.save(path)
    say("saved", gen)
    gen += 1
"""


def _generation(index: CorpusIndex) -> int:
    gen = int(index.versions[0])
    assert (index.versions == gen).all() and (index.embeddings == gen).all(), "a mix of two saves"
    return gen


def _kill_during_save(path: Path, mode: str, first: int, rng: random.Random) -> tuple[int, int, int]:
    """Start a writer, SIGKILL it during a save; (last generation reported saved, last started, saves seen).

    At least one save of a plain writer completes before the kill; a slow mode's first save is the one to
    interrupt."""
    trigger = {"plain": "saving", "slow-write": "writing", "slow-replace": "replacing"}[mode]
    return kill_writer([_WRITER, str(path), mode, str(first)], trigger, lambda saved: mode != "plain" or saved >= first,
                       rng.uniform(0.0, 0.06) if mode == "plain" else 0.05)


def test_sigkill_during_save_leaves_the_previous_complete_index(tmp_path):
    path = tmp_path / "live.index"
    n = 20000
    CorpusIndex([f"d{i}" for i in range(n)], np.zeros((n, 64), np.float32), 0).save(path)
    rng = random.Random(13)
    first = 1
    started = {0}
    partial = 0
    for round_no, mode in enumerate(["slow-replace", "slow-write", "plain", "plain", "plain"]):
        before = _generation(CorpusIndex.load(path))
        saved_gen, saving_gen, _ = _kill_during_save(path, mode, first, rng)
        started |= set(range(first, saving_gen + 1))
        temps = [p for p in tmp_path.iterdir() if p.name != path.name]  # the killed writer's, until a load
        assert all(p.name.endswith(".tmp") and p.name.startswith(f".{path.name}.") for p in temps), temps
        sizes = [p.stat().st_size for p in temps]
        for tmp in temps:  # a leftover is never mistaken for an index: it is refused, or a complete save
            try:
                assert _generation(CorpusIndex.load(tmp)) in started
            except IndexFileError:
                partial += 1
        loaded = CorpusIndex.load(path)  # must still load: never a partial file
        gen = _generation(loaded)
        assert len(loaded) == n
        assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the load removed the dead writer's temporary
        if mode == "slow-replace":  # killed before the rename: the old file, and a complete temp file
            assert gen == before and saving_gen == first
            assert temps, "the kill should have left the complete temp file"
        elif mode == "slow-write":  # killed mid-write: the old file, and a partial temp file
            assert gen == before and saving_gen == first
            assert any(size < path.stat().st_size for size in sizes)
        else:
            assert saved_gen <= gen <= saving_gen, (saved_gen, gen, saving_gen)
        first = saving_gen + 1000  # the next writer's generations are new ones
    assert partial >= 1


def test_ivf_replaces_updated_rows_in_place_and_gpu_needs_a_gpu():
    rng = np.random.default_rng(21)
    emb = unit(rng, 400, 16)
    index = CorpusIndex(ids(400), emb, factory="IVF4,Flat")
    index.search(emb[:1], 5)  # builds and syncs the IVF structure
    target = unit(rng, 1, 16)
    index.update([123], target, version=1)
    assert index._ann_synced  # replaced in place, no rebuild pending
    _, top = index.search(target, 1)
    assert top[0, 0] == 123
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="faiss-gpu"):
            CorpusIndex(ids(3), unit(rng, 3, 4), gpu=True)
